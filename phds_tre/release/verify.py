"""Verifying a release folder, and ``phds verify``.

:func:`verify_release` checks the Ed25519 signature over the manifest, the
sha256 of every file the manifest lists, and that the folder holds exactly
those files (plus ``manifest.json`` and ``signature.json``); each problem
names what was altered, added or removed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from phds_tre.release.manifest import MANIFEST_NAME, RELEASE_DIR, SIGNATURE_NAME, sha256_file
from phds_tre.release.signing import KeyFileError, load_public_key, verify_manifest_signature

__all__ = ["ReleaseInputError", "VerifyResult", "run_verify", "verify_release"]


class ReleaseInputError(ValueError):
    """Not a folder that can be verified (missing, not a folder); one-line message."""


@dataclass(frozen=True)
class VerifyResult:
    """Whether a release is intact, and every problem found (one sentence each)."""

    ok: bool
    problems: list[str] = field(default_factory=list)
    files: int = 0
    key_id: str | None = None
    trusted: bool | None = None  # None: no trusted keys were given


def _shown(name: str) -> str:
    # File names come from the folder (anyone could have added one): no control characters.
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key")
    return dict(pairs)


def _load_json(path: Path) -> tuple[Any, str | None]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, f"{path.name}: missing"
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"{path.name}: cannot read ({exc})"
    try:
        return json.loads(
            text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant
        ), None
    except (ValueError, RecursionError) as exc:
        return None, f"{path.name}: not valid JSON ({str(exc).splitlines()[0]})"


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _present_files(root: Path) -> tuple[set[str], list[str]]:
    """Relative paths of regular files under ``root``, and problems (links, odd entries)."""
    files: set[str] = set()
    problems: list[str] = []
    for current, dirs, names in os.walk(root, followlinks=False):
        base = Path(current)
        for name in list(dirs):
            if (base / name).is_symlink():
                rel = (base / name).relative_to(root).as_posix()
                problems.append(f"{_shown(rel)}: a link, not a folder of the release")
                dirs.remove(name)
        for name in names:
            path = base / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink() or not path.is_file():
                problems.append(f"{_shown(rel)}: not a regular file")
            else:
                files.add(rel)
    return files, problems


def _safe_rel(name: object) -> bool:
    if not isinstance(name, str) or not name or "\\" in name:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts and path.as_posix() == name


def verify_release(
    release_dir: str | Path, trusted_keys: Sequence[Ed25519PublicKey] | None = None
) -> VerifyResult:
    """Check a release folder's signature, file hashes, and extra or missing files.

    ``release_dir`` is the ``release`` folder (or the folder holding it).
    With ``trusted_keys``, the signing key must be one of them.
    """
    root = Path(release_dir)
    if not root.is_dir():
        raise ReleaseInputError(f"{root}: not a folder")
    if not (root / MANIFEST_NAME).exists() and (root / RELEASE_DIR / MANIFEST_NAME).exists():
        root = root / RELEASE_DIR
    if not (root / MANIFEST_NAME).exists() and not (root / SIGNATURE_NAME).exists():
        raise ReleaseInputError(
            f"{root}: not a release folder (no {MANIFEST_NAME}, no {SIGNATURE_NAME})"
        )

    problems: list[str] = []
    manifest, problem = _load_json(root / MANIFEST_NAME)
    if problem:
        problems.append(problem)
    signature, problem = _load_json(root / SIGNATURE_NAME)
    if problem:
        problems.append(problem)

    key = None
    if isinstance(manifest, Mapping) and signature is not None:
        key, found = verify_manifest_signature(manifest, signature, trusted_keys)
        problems.extend(found)
    elif manifest is not None and not isinstance(manifest, Mapping):
        problems.append(f"{MANIFEST_NAME}: not a JSON object")

    present, found_problems = _present_files(root)
    problems.extend(found_problems)
    listed = manifest.get("files") if isinstance(manifest, Mapping) else None
    if isinstance(manifest, Mapping) and not isinstance(listed, Mapping):
        problems.append(f"{MANIFEST_NAME}: no 'files' table")
    listed = listed if isinstance(listed, Mapping) else {}
    for name, digest in sorted(listed.items()):
        if not _safe_rel(name) or name in (MANIFEST_NAME, SIGNATURE_NAME):
            problems.append(
                f"{MANIFEST_NAME}: lists a path that cannot be in a release: {_shown(name)!r}"
            )
            continue
        if name not in present:
            problems.append(f"{_shown(name)}: missing (listed in the manifest)")
        elif sha256_file(root / name) != digest:
            problems.append(f"{_shown(name)}: altered (its sha256 differs from the manifest)")
    if isinstance(manifest, Mapping):
        for name in sorted(present - set(listed) - {MANIFEST_NAME, SIGNATURE_NAME}):
            problems.append(f"{_shown(name)}: extra file, not in the manifest")

    trusted = None if trusted_keys is None else not any("not a trusted key" in p for p in problems)
    return VerifyResult(not problems, problems, len(listed), key, trusted)


def run_verify(
    release_dir: str,
    key_paths: Sequence[str],
    echo: Callable[[str], None],
    error: Callable[[str], None] | None = None,
) -> int:
    """``phds verify``: print one line per problem or a summary; return the exit status.

    0 verified, 1 altered (or signed by an untrusted key), 2 bad input (no
    such folder, not a release folder, unreadable key file). ``error``
    prints the bad-input message (default: ``echo``).
    """
    try:
        keys = [load_public_key(p) for p in key_paths] or None
        result = verify_release(release_dir, keys)
    except (KeyFileError, ReleaseInputError) as exc:
        (error or echo)(f"phds: error: {' '.join(str(exc).split())}")
        return 2
    if not result.ok:
        for problem in result.problems:
            echo(problem)
        return 1
    line = f"release verified: {result.files} files, signed by key {result.key_id}"
    if result.trusted is None:
        line += " (not checked against a trusted key: pass --key)"
    echo(line)
    return 0
