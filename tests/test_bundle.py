"""Study bundles: built, signed, addressed by sha256, and every kind of tampering named."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nbformat
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nbformat.v4 import new_code_cell, new_notebook

from phds_tre.bundle import (
    MAX_BUNDLE_BYTES,
    BundleError,
    StudyBundle,
    StudyManifest,
    build_bundle,
    read_bundle,
    verify_bundle,
    write_bundle,
)
from phds_tre.release.signing import canonical_json, generate_key, key_id, sign_manifest

PHDS = Path(sys.executable).with_name("phds")
CREATED = "2024-05-01T12:00:00Z"


def _notebook(path: Path, body: str = "print(min_age, label)") -> Path:
    nb = new_notebook(
        cells=[
            new_code_cell(
                "min_age: int = 0\nlabel = 'all'\nweights: list = []",
                metadata={"tags": ["parameters"]},
            ),
            new_code_cell(body),
        ]
    )
    nbformat.write(nb, path)
    return path


def _fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "title": "PICU sepsis mortality",
        "purpose": "Pool 30-day mortality",
        "researcher": "Dr A",
        "sites": ["site_a", "site_b"],
        "parameters": {"min_age": "2"},
        "site_parameters": {"site_b": {"label": "cardiac"}},
        "created": CREATED,
    }
    fields.update(overrides)
    return fields


@pytest.fixture
def key(tmp_path: Path) -> Ed25519PrivateKey:
    return generate_key(tmp_path / "researcher.pem")


@pytest.fixture
def study(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    bundle = build_bundle(_notebook(tmp_path / "study.ipynb"), _fields(), key)
    return write_bundle(bundle, tmp_path / "study.zip")


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _rezip(path: Path, members: Mapping[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _problems(path: Path, key: Ed25519PrivateKey | None = None) -> str:
    result = verify_bundle(path, [key.public_key()] if key else None)
    assert not result.ok
    assert result.bundle is None
    return "\n".join(result.problems)


# --- building and reading ------------------------------------------------------------------


def test_round_trip(study: Path, key: Ed25519PrivateKey) -> None:
    result = verify_bundle(study, [key.public_key()])
    assert result.ok, result.problems
    assert result.trusted is True
    assert result.key_id == key_id(key.public_key())
    bundle = read_bundle(study, [key.public_key()])
    assert result.study_id == bundle.study_id
    assert bundle.manifest.title == "PICU sepsis mortality"
    assert bundle.manifest.parameters == {"min_age": 2}  # converted to the declared int
    assert bundle.parameters_for("site_a") == {"min_age": 2}
    assert bundle.parameters_for("site_b") == {"min_age": 2, "label": "cardiac"}
    with pytest.raises(BundleError, match="not a target"):
        bundle.parameters_for("site_c")
    assert sorted(_members(study)) == ["manifest.json", "notebook.ipynb", "signature.json"]
    manifest = json.loads(_members(study)["manifest.json"])
    assert manifest["schema"] == "phds.study/1"
    assert (
        manifest["notebook_sha256"]
        == hashlib.sha256((study.parent / "study.ipynb").read_bytes()).hexdigest()
    )


def test_verify_accepts_a_bundle_object_and_no_trusted_keys(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    bundle = build_bundle(_notebook(tmp_path / "s.ipynb"), _fields(), key)
    result = verify_bundle(bundle)
    assert result.ok
    assert result.trusted is None
    assert result.study_id == bundle.study_id


def test_address_is_stable_and_zip_deterministic(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    notebook = _notebook(tmp_path / "s.ipynb")
    first = build_bundle(notebook, _fields(), key)
    second = build_bundle(notebook, _fields(), key)
    assert first.study_id == second.study_id
    assert first.study_id == hashlib.sha256(first.manifest_bytes).hexdigest()
    assert first.to_bytes() == second.to_bytes()  # Ed25519 signatures are deterministic
    a = write_bundle(first, tmp_path / "a.zip").read_bytes()
    b = write_bundle(second, tmp_path / "b.zip").read_bytes()
    assert a == b
    with zipfile.ZipFile(io.BytesIO(a)) as archive:
        for info in archive.infolist():
            assert info.date_time == (1980, 1, 1, 0, 0, 0)
            assert info.extra == b""
        assert archive.namelist() == sorted(archive.namelist())
    # Any change to the notebook or the manifest changes the address.
    other = build_bundle(_notebook(tmp_path / "o.ipynb", "print(1)"), _fields(), key)
    assert other.study_id != first.study_id
    assert build_bundle(notebook, _fields(title="Other"), key).study_id != first.study_id


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"parameters": {"nonsense": 1}}, "unknown parameter 'nonsense'"),
        ({"parameters": {"min_age": "old"}}, "parameter 'min_age': expected int"),
        ({"site_parameters": {"site_b": {"min_age": "x"}}}, "site site_b: parameter 'min_age'"),
        ({"site_parameters": {"site_z": {"label": "x"}}}, "not in sites"),
        ({"sites": []}, "sites"),
        ({"sites": ["Site A"]}, "must match"),
        ({"title": "  "}, "title"),
        ({"created": "2024-05-01 12:00"}, "UTC"),
        ({"colour": "blue"}, "colour"),
        ({"notebook_sha256": "0" * 64}, "computed"),
    ],
)
def test_bad_manifest_or_parameters_refused_at_build(
    tmp_path: Path, key: Ed25519PrivateKey, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(BundleError, match=message) as caught:
        build_bundle(_notebook(tmp_path / "s.ipynb"), _fields(**overrides), key)
    assert "\n" not in str(caught.value)


def test_unreadable_notebook_refused(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    (tmp_path / "bad.ipynb").write_text("{not json")
    with pytest.raises(BundleError, match="not a readable notebook"):
        build_bundle(tmp_path / "bad.ipynb", _fields(), key)
    with pytest.raises(BundleError, match="cannot read notebook"):
        build_bundle(tmp_path / "missing.ipynb", _fields(), key)


def test_manifest_model_is_strict() -> None:
    with pytest.raises(ValueError):
        StudyManifest.model_validate(
            {
                "schema": "phds.study/2",
                "title": "t",
                "purpose": "",
                "researcher": "r",
                "created": CREATED,
                "sites": ["a"],
                "parameters": {},
                "site_parameters": {},
                "notebook_sha256": "0" * 64,
            }
        )


# --- tampering -----------------------------------------------------------------------------


def test_edited_notebook_named(study: Path, key: Ed25519PrivateKey) -> None:
    members = _members(study)
    members["notebook.ipynb"] = members["notebook.ipynb"].replace(b"print(", b"exfiltrate(")
    problems = _problems(_rezip(study, members), key)
    assert "notebook.ipynb: sha256" in problems
    assert "altered or swapped" in problems


def test_edited_manifest_field_named(study: Path, key: Ed25519PrivateKey) -> None:
    members = _members(study)
    manifest = json.loads(members["manifest.json"])
    manifest["sites"] = ["site_a", "site_b", "site_c"]
    members["manifest.json"] = canonical_json(manifest)
    assert "signature: does not match manifest.json" in _problems(_rezip(study, members), key)


def test_non_canonical_manifest_named(study: Path, key: Ed25519PrivateKey) -> None:
    members = _members(study)
    members["manifest.json"] = json.dumps(json.loads(members["manifest.json"]), indent=1).encode()
    assert "not in canonical form" in _problems(_rezip(study, members), key)


def test_edited_signature_named(study: Path, key: Ed25519PrivateKey) -> None:
    members = _members(study)
    signature = json.loads(members["signature.json"])
    raw = bytearray(signature["signature"].encode())
    raw[5] = ord("A") if raw[5] != ord("A") else ord("B")
    signature["signature"] = raw.decode()
    members["signature.json"] = canonical_json(signature)
    assert "signature: does not match manifest.json" in _problems(_rezip(study, members), key)
    members["signature.json"] = b"not json"
    assert "signature.json: not valid JSON" in _problems(_rezip(study, members), key)


def test_swapped_notebook_resigned_by_untrusted_key(
    tmp_path: Path, study: Path, key: Ed25519PrivateKey
) -> None:
    attacker = generate_key(tmp_path / "attacker.pem")
    evil = _notebook(tmp_path / "evil.ipynb", "import os; os.system('curl x')")
    forged = build_bundle(evil, _fields(), attacker)
    write_bundle(forged, study)
    result = verify_bundle(study, [key.public_key()])
    assert not result.ok
    assert result.trusted is False
    assert result.key_id == key_id(attacker.public_key())
    assert any("not a trusted key" in p for p in result.problems)
    with pytest.raises(BundleError, match="not a trusted key"):
        read_bundle(study, [key.public_key()])
    # Without trusted keys it is intact (integrity only), and says so.
    assert verify_bundle(study).ok


def test_extra_member_named(study: Path, key: Ed25519PrivateKey) -> None:
    members = _members(study) | {"notes.txt": b"hi"}
    assert "extra member 'notes.txt'" in _problems(_rezip(study, members), key)


def test_missing_member_named(study: Path, key: Ed25519PrivateKey) -> None:
    members = _members(study)
    del members["signature.json"]
    assert "missing member 'signature.json'" in _problems(_rezip(study, members), key)


@pytest.mark.parametrize("name", ["../evil.py", "/etc/cron.d/x", "sub/../../x", "a\\..\\b"])
def test_path_traversal_member_named(study: Path, key: Ed25519PrivateKey, name: str) -> None:
    members = _members(study) | {name: b"x"}
    assert "unsafe member name" in _problems(_rezip(study, members), key)


def test_duplicate_member_named(study: Path, key: Ed25519PrivateKey) -> None:
    members = _members(study)
    with (
        pytest.warns(UserWarning, match="Duplicate name"),
        zipfile.ZipFile(study, "a") as archive,
    ):
        archive.writestr("manifest.json", members["manifest.json"])
    assert "appears 2 times" in _problems(study, key)


def test_oversized_member_refused_before_decompressing(study: Path, key: Ed25519PrivateKey) -> None:
    members = _members(study)
    members["notebook.ipynb"] = b"\0" * (MAX_BUNDLE_BYTES + 1)  # a small zip bomb
    bomb = _rezip(study, members)
    assert bomb.stat().st_size < MAX_BUNDLE_BYTES // 100
    problems = _problems(bomb, key)
    assert "notebook.ipynb" in problems
    assert "more than the limit" in problems


def test_oversized_file_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.zip"
    with big.open("wb") as handle:
        handle.truncate(MAX_BUNDLE_BYTES + 1)
    assert "more than the limit" in _problems(big)


def test_corrupt_member_named(study: Path, key: Ed25519PrivateKey) -> None:
    data = bytearray(study.read_bytes())
    with zipfile.ZipFile(study) as archive:
        info = archive.getinfo("notebook.ipynb")
    # Flip a byte inside the compressed data of the notebook (after its local header).
    start = info.header_offset + 30 + len(info.filename)
    data[start + info.compress_size // 2] ^= 0xFF
    study.write_bytes(bytes(data))
    assert "notebook.ipynb: corrupt member" in _problems(study, key)


def test_not_a_zip_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "x.zip").write_text("hello")
    with pytest.raises(BundleError, match="not a zip"):
        verify_bundle(tmp_path / "x.zip")
    with pytest.raises(BundleError, match="cannot read"):
        verify_bundle(tmp_path / "missing.zip")


def test_signed_manifest_with_bad_parameters_named(
    tmp_path: Path, study: Path, key: Ed25519PrivateKey
) -> None:
    """A manifest made by another tool, properly signed, still gets its parameters checked."""
    members = _members(study)
    manifest = json.loads(members["manifest.json"])
    manifest["parameters"] = {"min_age": "two"}
    members["manifest.json"] = canonical_json(manifest)
    members["signature.json"] = canonical_json(sign_manifest(manifest, key))
    problems = _problems(_rezip(study, members), key)
    assert "parameters of site site_a" in problems


def test_bundle_object_fields_are_checked(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    bundle = build_bundle(_notebook(tmp_path / "s.ipynb"), _fields(), key)
    swapped = StudyBundle(notebook=b"{}", manifest=bundle.manifest, signature=bundle.signature)
    assert any("notebook.ipynb: sha256" in p for p in verify_bundle(swapped).problems)


# --- command line --------------------------------------------------------------------------


def _phds(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PHDS), *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def test_cli_bundle_and_verify(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    notebook = _notebook(tmp_path / "s.ipynb")
    out = tmp_path / "study.zip"
    made = _phds(
        "bundle", notebook, "--title", "T", "--sites", "site_a,site_b", "--purpose", "P",
        "-p", "min_age", "3", "--site-param", "site_b", "label", "x",
        "--key", tmp_path / "researcher.pem", "--out", out,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    study_id = made.stdout.strip()
    bundle = read_bundle(out)
    assert study_id == bundle.study_id
    assert bundle.parameters_for("site_b") == {"min_age": 3, "label": "x"}

    ok = _phds("bundle-verify", out, "--key", tmp_path / "researcher.pem.pub")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert study_id in ok.stdout
    assert "trusted" in ok.stdout

    other = generate_key(tmp_path / "other.pem")
    assert other is not None
    untrusted = _phds("bundle-verify", out, "--key", tmp_path / "other.pem.pub")
    assert untrusted.returncode == 1
    assert "not a trusted key" in untrusted.stdout

    members = _members(out)
    members["notebook.ipynb"] += b"\n"
    altered = _phds("bundle-verify", _rezip(out, members))
    assert altered.returncode == 1
    assert "notebook.ipynb: sha256" in altered.stdout


def test_cli_bad_input_exits_2(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    notebook = _notebook(tmp_path / "s.ipynb")
    bad_param = _phds(
        "bundle", notebook, "--title", "T", "--sites", "site_a", "-p", "nope", "1",
        "--key", tmp_path / "researcher.pem", "--out", tmp_path / "x.zip",
    )  # fmt: skip
    assert bad_param.returncode == 2
    assert bad_param.stderr.strip().count("\n") == 0
    assert "unknown parameter 'nope'" in bad_param.stderr
    assert not (tmp_path / "x.zip").exists()

    missing = _phds("bundle-verify", tmp_path / "missing.zip")
    assert missing.returncode == 2
    assert missing.stderr.startswith("phds: error:")
    (tmp_path / "junk.zip").write_text("junk")
    assert _phds("bundle-verify", tmp_path / "junk.zip").returncode == 2
