"""Writing a release folder: notebook, shared results, ACRO results, manifest and signature.

Layout of ``<out_dir>/release/``::

    release.ipynb            the release notebook (phds_tre.release.notebook)
    shared/<name>.json       shared results: structured payloads without evidence
    results.json             ACRO's results format (phds_tre.release.acro) …
    cell_<c>_output_<o>.*    … and the files it names (tables as CSV)
    checksums/<file>.txt     … with ACRO's per-file checksums
    manifest.json            what the caller knows (study, notebook and policy hashes,
                             parameters, site, verdicts, decisions, timings) +
                             ``release`` (counts, one item per output) +
                             ``files`` {relative path: sha256 hex} + ``created``
    signature.json           Ed25519 over the canonical JSON of manifest.json

The folder is built in a temporary folder beside ``release/`` and renamed at
the end (one ``rename`` on the same file system), so a crash never leaves a
half-written folder under the name ``release``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from phds_tre.release.acro import acro_results
from phds_tre.release.notebook import ReleaseError, ReleaseNotebook
from phds_tre.release.signing import sign_manifest

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_SCHEMA",
    "RELEASE_DIR",
    "RESERVED_FIELDS",
    "SIGNATURE_NAME",
    "file_hashes",
    "sha256_file",
    "write_release",
]

MANIFEST_SCHEMA = "phds.release/1"
RELEASE_DIR = "release"
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "signature.json"
#: Manifest keys this module writes; a caller's ``manifest_fields`` may not use them.
RESERVED_FIELDS = frozenset({"schema", "files", "created", "release"})
_SHARED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


def sha256_file(path: Path) -> str:
    """sha256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(root: Path, exclude: frozenset[str] = frozenset()) -> dict[str, str]:
    """``{relative posix path: sha256}`` of every regular file under ``root`` (sorted)."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not path.is_symlink() and rel not in exclude:
            found[rel] = sha256_file(path)
    return found


def _json_bytes(value: Any) -> bytes:
    return (
        json.dumps(value, indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"
    ).encode("utf-8")


def _has_evidence(value: object) -> bool:
    if isinstance(value, Mapping):
        return "evidence" in value or any(_has_evidence(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_evidence(v) for v in value)
    return False


def _check_inputs(
    manifest_fields: Mapping[str, Any], shared: Mapping[str, Mapping[str, Any]]
) -> None:
    reserved = sorted(RESERVED_FIELDS & set(manifest_fields))
    if reserved:
        raise ReleaseError(f"manifest fields {', '.join(reserved)} are written by write_release")
    try:
        json.dumps(manifest_fields, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ReleaseError(f"manifest fields are not JSON: {exc}") from None
    for name, payload in shared.items():
        if not _SHARED_NAME.fullmatch(name) or ".." in name:
            raise ReleaseError(f"shared result name {name!r}: letters, digits, '_', '-', '.' only")
        if _has_evidence(payload):
            raise ReleaseError(f"shared result {name!r} carries evidence: it never leaves the site")


def _write(root: Path, rel: str, content: bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def write_release(
    out_dir: str | Path,
    release: ReleaseNotebook,
    manifest_fields: Mapping[str, Any],
    shared: Mapping[str, Mapping[str, Any]],
    key: Ed25519PrivateKey,
    *,
    created: dt.datetime | None = None,
) -> Path:
    """Write ``out_dir/release/`` atomically and return its path.

    ``manifest_fields`` are the caller's (study and notebook hashes,
    parameters, site, policy hash, verdicts, decisions, timings); this adds
    ``schema``, ``release`` (counts and one item per output), ``files`` and
    ``created``. ``shared`` maps names to checked payloads without evidence.
    An existing ``release/`` is never replaced.
    """
    out_dir = Path(out_dir)
    final = out_dir / RELEASE_DIR
    _check_inputs(manifest_fields, shared)
    out_dir.mkdir(parents=True, exist_ok=True)
    if final.exists() or final.is_symlink():
        raise ReleaseError(f"{final}: already exists (a release is never overwritten)")
    moment = (created or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    stamp = moment.isoformat(timespec="seconds").replace("+00:00", "Z")

    tmp = Path(tempfile.mkdtemp(prefix=f".{RELEASE_DIR}-", suffix=".tmp", dir=out_dir))
    try:
        _write(tmp, "release.ipynb", release.dumps().encode("utf-8"))
        for name, payload in sorted(shared.items()):
            _write(tmp, f"shared/{name}.json", _json_bytes(payload))
        results, acro_files = acro_results(release, stamp)
        _write(tmp, "results.json", _json_bytes(results))
        for rel, content in acro_files.items():
            _write(tmp, rel, content)
        manifest = {
            **manifest_fields,
            "schema": MANIFEST_SCHEMA,
            "release": {
                "counts": release.counts,
                "outputs": [item.to_dict() for item in release.items],
            },
            "files": file_hashes(tmp),
            "created": stamp,
        }
        _write(tmp, MANIFEST_NAME, _json_bytes(manifest))
        _write(tmp, SIGNATURE_NAME, _json_bytes(sign_manifest(manifest, key)))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a release is for reading
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
