"""The release folder: written atomically, signed, ACRO/SACRO-Viewer readable, and verified."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbformat
import pandas as pd
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output
from PIL import Image

from phds_tre import sdc
from phds_tre.check import check_notebook
from phds_tre.release import (
    KeyFileError,
    ReleaseError,
    ReleaseInputError,
    ReleaseNotebook,
    build_release,
    generate_key,
    key_id,
    load_private_key,
    load_public_key,
    verify_release,
    write_release,
)
from phds_tre.release import manifest as manifest_module
from phds_tre.release.acro import ACRO_VERSION, table_frame
from phds_tre.release.signing import canonical_json, sign_manifest
from phds_tre.site_policy import SitePolicy

PHDS = Path(sys.executable).with_name("phds")
POLICY = SitePolicy()
CREATED = dt.datetime(2026, 5, 4, 3, 2, 1, tzinfo=dt.UTC)
ACRO_KEYS = {
    "uid",
    "status",
    "type",
    "properties",
    "files",
    "outcome",
    "command",
    "summary",
    "timestamp",
    "comments",
    "exception",
}


def _bundle(out: Any) -> dict[str, Any]:
    return json.loads(json.dumps(out._repr_mimebundle_()))


def _table(small: int) -> Any:
    rows = [("F", "a")] * 15 + [("F", "b")] * 15 + [("M", "a")] * 20 + [("M", "b")] * small
    df = pd.DataFrame(rows, columns=["sex", "band"])
    return sdc.crosstab(df.sex, df.band)


def _png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), "blue").save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _release() -> ReleaseNotebook:
    """Cells: 1 safe table, 2 suppressed table (approved), 3 stream, 4 image (approved), 5 held."""
    nb = new_notebook(
        cells=[
            new_markdown_cell("# Study"),
            new_code_cell(
                "sdc.crosstab(df.sex, df.band)",
                execution_count=1,
                outputs=[new_output("execute_result", data=_bundle(_table(12)), execution_count=1)],
            ),
            new_code_cell(
                "small",
                execution_count=2,
                outputs=[new_output("display_data", data=_bundle(_table(5)))],
            ),
            new_code_cell(
                "print('done')",
                execution_count=3,
                outputs=[new_output("stream", name="stdout", text="done\n")],
            ),
            new_code_cell(
                "plt.show()",
                execution_count=4,
                outputs=[new_output("display_data", data={"image/png": _png()})],
            ),
            new_code_cell(
                "print(n)",
                execution_count=5,
                outputs=[new_output("stream", name="stdout", text="n is 4\n")],
            ),
        ]
    )
    report = check_notebook(nb, POLICY.disclosure)
    return build_release(nb, report, POLICY, decisions={(2, 0): "approve", (4, 0): "approve"})


@pytest.fixture(scope="module")
def release() -> ReleaseNotebook:
    return _release()


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


FIELDS = {
    "study": {"id": "study-1", "sha256": "ab" * 32},
    "notebook_sha256": "cd" * 32,
    "parameters": {"site": "HSJD", "min_age": 0},
    "site": "HSJD",
    "policy_hash": POLICY.hash,
    "verdicts": {"1:0": "pass"},
    "decisions": {"2:0": "approve", "4:0": "approve"},
    "timings": {"execute_s": 1.5},
}


def _write(tmp_path: Path, release: ReleaseNotebook, key: Ed25519PrivateKey) -> Path:
    shared = {"sex_by_band": _table(12).release_payload()}
    return write_release(tmp_path / "out", release, FIELDS, shared, key, created=CREATED)


@pytest.fixture
def written(tmp_path: Path, release: ReleaseNotebook, key: Ed25519PrivateKey) -> Path:
    return _write(tmp_path, release, key)


def _manifest(root: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((root / "manifest.json").read_text())
    return loaded


def test_write_and_verify(written: Path, release: ReleaseNotebook, key: Ed25519PrivateKey) -> None:
    assert written.name == "release"
    assert sorted(p.name for p in written.parent.iterdir()) == ["release"]  # no temp folder left
    manifest = _manifest(written)
    for name, value in FIELDS.items():
        assert manifest[name] == value
    assert manifest["schema"] == "phds.release/1"
    assert manifest["created"] == "2026-05-04T03:02:01Z"
    assert (
        manifest["release"]["counts"] == release.counts == {"released": 4, "held": 1, "withheld": 0}
    )
    assert len(manifest["release"]["outputs"]) == 5
    on_disk = {p.relative_to(written).as_posix() for p in written.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json", "signature.json"}
    assert {"release.ipynb", "results.json", "shared/sex_by_band.json"} <= set(manifest["files"])

    signature = json.loads((written / "signature.json").read_text())
    assert signature["key_id"] == key_id(key.public_key())
    assert base64.b64decode(signature["public_key"]) == key.public_key().public_bytes_raw()
    key.public_key().verify(base64.b64decode(signature["signature"]), canonical_json(manifest))

    result = verify_release(written, [key.public_key()])
    assert result.ok, result.problems
    assert (result.files, result.key_id, result.trusted) == (
        len(manifest["files"]),
        signature["key_id"],
        True,
    )
    assert verify_release(written.parent).ok  # the folder holding release/ works too
    assert verify_release(written).trusted is None

    nb = nbformat.read(written / "release.ipynb", as_version=4)
    nbformat.validate(nb)
    assert "evidence" not in (written / "release.ipynb").read_text()
    shared = json.loads((written / "shared" / "sex_by_band.json").read_text())
    assert "evidence" not in shared and shared["kind"] == "table"


def test_results_json_follows_acro(written: Path, release: ReleaseNotebook) -> None:
    results = json.loads((written / "results.json").read_text())
    assert results["version"] == ACRO_VERSION
    major, minor, *_ = results["version"].split(".")
    assert (int(major), int(minor)) >= (0, 4)  # SACRO-Viewer supports 0.4.x onwards
    assert list(results["results"]) == [
        "cell_1_output_0",
        "cell_2_output_0",
        "cell_3_output_0",
        "cell_4_output_0",
    ]
    for uid, record in results["results"].items():
        assert set(record) == ACRO_KEYS and record["uid"] == uid
        assert record["files"]
        for entry in record["files"]:
            path = written / entry["name"]
            assert path.is_file() and "sdc" in entry
            checksum = (written / "checksums" / f"{entry['name']}.txt").read_text()
            assert checksum == manifest_module.sha256_file(path)
    safe, small = results["results"]["cell_1_output_0"], results["results"]["cell_2_output_0"]
    assert (safe["type"], safe["status"], safe["summary"]) == ("table", "pass", "pass")
    assert safe["properties"]["method"] == "crosstab"
    assert safe["command"] == "sdc.crosstab(df.sex, df.band)"
    sdc_info = small["files"][0]["sdc"]
    assert sdc_info["summary"]["suppressed"] is True and sdc_info["summary"]["threshold"] == 1
    assert sdc_info["cells"]["threshold"] == [[1, 1]]
    assert small["outcome"] == {"a": {"F": "ok", "M": "ok"}, "b": {"F": "ok", "M": "threshold; "}}
    assert small["summary"].startswith("review; threshold: 1 cells suppressed")
    assert "reviewer decision: approve" in small["comments"]
    with (written / "cell_2_output_0.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows == [["sex", "a", "b"], ["F", "15.0", "15.0"], ["M", "20.0", ""]]
    assert results["results"]["cell_3_output_0"]["type"] == "custom"
    assert (written / "cell_3_output_0.txt").read_text() == "done\n"
    with Image.open(written / "cell_4_output_0.png") as image:
        assert image.format == "PNG"
    # SACRO-Viewer picks the one valid ACRO file among the folder's *.json files.
    valid = [
        p.name
        for p in written.glob("*.json")
        if {"version", "results"} <= set(json.loads(p.read_text()))
    ]
    assert valid == ["results.json"]


def test_table_frame_round_trip() -> None:
    out = _table(5)
    frame = table_frame(out.release_payload()["table"])
    pd.testing.assert_frame_equal(
        frame,
        out.table.astype(float),
        check_names=True,
        check_index_type=False,
        check_column_type=False,
    )


def _files(root: Path) -> list[str]:
    return sorted(_manifest(root)["files"])


@pytest.mark.parametrize(
    "name",
    [
        "release.ipynb",
        "results.json",
        "cell_2_output_0.csv",
        "cell_4_output_0.png",
        "shared/sex_by_band.json",
        "checksums/cell_1_output_0.csv.txt",
    ],
)
def test_tampered_file_is_named(written: Path, name: str) -> None:
    assert name in _files(written)
    path = written / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    result = verify_release(written)
    assert not result.ok
    assert result.problems == [f"{name}: altered (its sha256 differs from the manifest)"]


def test_tampered_manifest(written: Path) -> None:
    manifest = _manifest(written)
    manifest["release"]["counts"]["released"] += 1
    (written / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_release(written).problems
    assert problems == [
        "signature: does not match manifest.json (the manifest or the signature was altered)"
    ]


def test_altered_file_with_updated_manifest_hash(written: Path) -> None:
    (written / "cell_2_output_0.csv").write_text("sex,a,b\nM,20,5\n")
    manifest = _manifest(written)
    manifest["files"]["cell_2_output_0.csv"] = manifest_module.sha256_file(
        written / "cell_2_output_0.csv"
    )
    (written / "manifest.json").write_text(json.dumps(manifest, indent=1))
    problems = verify_release(written).problems
    assert len(problems) == 1 and problems[0].startswith("signature: does not match manifest.json")


def test_tampered_signature(written: Path) -> None:
    signature = json.loads((written / "signature.json").read_text())
    raw = bytearray(base64.b64decode(signature["signature"]))
    raw[0] ^= 0x01
    signature["signature"] = base64.b64encode(bytes(raw)).decode()
    (written / "signature.json").write_text(json.dumps(signature))
    assert verify_release(written).problems == [
        "signature: does not match manifest.json (the manifest or the signature was altered)"
    ]
    (written / "signature.json").write_text("{not json")
    assert verify_release(written).problems[0].startswith("signature.json: not valid JSON")


def test_resigned_by_another_key(written: Path, key: Ed25519PrivateKey) -> None:
    # Anyone can re-sign an altered manifest with their own key: only a trusted key tells.
    other = Ed25519PrivateKey.generate()
    (written / "signature.json").write_text(json.dumps(sign_manifest(_manifest(written), other)))
    assert verify_release(written).ok
    problems = verify_release(written, [key.public_key()]).problems
    assert problems == [
        f"signature: signed by key {key_id(other.public_key())}, which is not a trusted key"
    ]


def test_added_and_removed_files(written: Path) -> None:
    (written / "notes.txt").write_text("extra")
    (written / "shared" / "more.json").write_text("{}")
    (written / "cell_3_output_0.txt").unlink()
    (written / "manifest.json").rename(written / "manifest.json.bak")
    problems = verify_release(written).problems
    assert problems == ["manifest.json: missing"]
    (written / "manifest.json.bak").rename(written / "manifest.json")
    assert verify_release(written).problems == [
        "cell_3_output_0.txt: missing (listed in the manifest)",
        "notes.txt: extra file, not in the manifest",
        "shared/more.json: extra file, not in the manifest",
    ]


def test_link_is_not_a_release_file(written: Path) -> None:
    (written / "release.ipynb").rename(written / "elsewhere.ipynb")
    (written / "release.ipynb").symlink_to(written / "elsewhere.ipynb")
    problems = verify_release(written).problems
    assert "release.ipynb: not a regular file" in problems
    assert "release.ipynb: missing (listed in the manifest)" in problems
    assert "elsewhere.ipynb: extra file, not in the manifest" in problems


def test_manifest_path_outside_the_release(written: Path, key: Ed25519PrivateKey) -> None:
    manifest = _manifest(written)
    manifest["files"]["../outside.txt"] = "00" * 32
    (written / "manifest.json").write_text(json.dumps(manifest))
    (written / "signature.json").write_text(json.dumps(sign_manifest(manifest, key)))
    assert verify_release(written).problems == [
        "manifest.json: lists a path that cannot be in a release: '../outside.txt'"
    ]


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ReleaseInputError, match="not a folder"):
        verify_release(tmp_path / "missing")
    with pytest.raises(ReleaseInputError, match="not a release folder"):
        verify_release(tmp_path)


def test_atomic_write_leaves_nothing_on_failure(
    tmp_path: Path,
    release: ReleaseNotebook,
    key: Ed25519PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(manifest_module, "sign_manifest", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        _write(tmp_path, release, key)
    assert list((tmp_path / "out").iterdir()) == []  # no release/, no temporary folder
    monkeypatch.undo()
    assert _write(tmp_path, release, key).is_dir()
    with pytest.raises(ReleaseError, match="already exists"):
        _write(tmp_path, release, key)


def test_write_release_refuses_bad_inputs(
    tmp_path: Path, release: ReleaseNotebook, key: Ed25519PrivateKey
) -> None:
    with_evidence = _table(12).to_payload()
    with pytest.raises(ReleaseError, match="evidence"):
        write_release(tmp_path, release, {}, {"t": with_evidence}, key)
    with pytest.raises(ReleaseError, match="letters"):
        write_release(tmp_path, release, {}, {"../t": {}}, key)
    with pytest.raises(ReleaseError, match="files"):
        write_release(tmp_path, release, {"files": {}}, {}, key)
    with pytest.raises(ReleaseError, match="not JSON"):
        write_release(tmp_path, release, {"x": float("nan")}, {}, key)
    assert not (tmp_path / "release").exists()


def test_keys(tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    key = generate_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key_id(load_public_key(tmp_path / "site.key.pub")) == key_id(key.public_key())
    assert key_id(load_private_key(path).public_key()) == key_id(key.public_key())
    raw = tmp_path / "raw.pub"
    raw.write_text(base64.b64encode(key.public_key().public_bytes_raw()).decode())
    assert key_id(load_public_key(raw)) == key_id(key.public_key())
    with pytest.raises(KeyFileError, match="already exists"):
        generate_key(path)
    with pytest.raises(KeyFileError, match="private key; give the public key"):
        load_public_key(path)
    with pytest.raises(KeyFileError, match="cannot read"):
        load_private_key(tmp_path / "none.key")
    (tmp_path / "junk").write_text("hello")
    with pytest.raises(KeyFileError, match="not a public key"):
        load_public_key(tmp_path / "junk")
    with pytest.raises(KeyFileError, match="not a PEM private key"):
        load_private_key(tmp_path / "junk")


def _phds(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PHDS), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_phds_keygen_and_verify_exit_codes(tmp_path: Path, release: ReleaseNotebook) -> None:
    keyfile = tmp_path / "keys" / "site.key"
    keyfile.parent.mkdir()
    proc = _phds("keygen", "--out", str(keyfile))
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    key = load_private_key(keyfile)
    assert key_id(key.public_key()) in proc.stdout
    root = write_release(tmp_path / "out", release, FIELDS, {}, key)

    proc = _phds("verify", str(root), "--key", f"{keyfile}.pub")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = len(_manifest(root)["files"])
    assert (
        proc.stdout.strip()
        == f"release verified: {files} files, signed by key {key_id(key.public_key())}"
    )

    (root / "results.json").write_text("{}")
    (root / "added.txt").write_text("x")
    proc = _phds("verify", str(root))
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[:2] == [
        "results.json: altered (its sha256 differs from the manifest)",
        "added.txt: extra file, not in the manifest",
    ]

    assert _phds("verify", str(tmp_path / "nowhere")).returncode == 2
    proc = _phds("verify", str(root), "--key", str(keyfile))  # a private key given as --key
    assert proc.returncode == 2 and "give the public key" in proc.stderr
    assert _phds("keygen", "--out", str(keyfile)).returncode == 2
    assert os.access(keyfile, os.R_OK)
