"""Unpacking an uploaded release archive (zip or tar.gz) safely into a folder.

The archive comes from the network, so every member is checked before anything is
written: only regular files and folders, relative names with no ``..``, no links or
devices, limits on the number of members and on the total unpacked size (checked
against the declared sizes first and again while copying, since those can lie).
"""

from __future__ import annotations

import io
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO

__all__ = ["MAX_MEMBERS", "MAX_UNPACKED_BYTES", "ArchiveError", "archive_format", "unpack"]

MAX_MEMBERS = 10_000
MAX_UNPACKED_BYTES = 200 * 1024 * 1024
_CHUNK = 1024 * 1024


class ArchiveError(ValueError):
    """An archive that cannot be unpacked safely; one-line message."""


def archive_format(data: bytes) -> str:
    """``zip`` or ``tar.gz`` from the leading bytes; ArchiveError for anything else."""
    if data.startswith(b"PK\x03\x04"):
        return "zip"
    if data.startswith(b"\x1f\x8b"):
        return "tar.gz"
    raise ArchiveError("not a zip or tar.gz archive")


def _target(root: Path, name: str) -> Path:
    if not name or "\\" in name or "\x00" in name:
        raise ArchiveError(f"unsafe member name {name!r}")
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise ArchiveError(f"unsafe member name {name!r} (path traversal)")
    parts = [p for p in path.parts if p not in ("", ".")]
    if not parts:
        raise ArchiveError(f"unsafe member name {name!r}")
    return root.joinpath(*parts)


def _copy(source: IO[bytes], target: Path, budget: int) -> int:
    """Copy at most ``budget`` bytes; ArchiveError if the member holds more."""
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with target.open("xb") as out:
        while chunk := source.read(_CHUNK):
            written += len(chunk)
            if written > budget:
                raise ArchiveError(f"unpacks to more than {MAX_UNPACKED_BYTES} bytes")
            out.write(chunk)
    return written


def unpack(data: bytes, root: Path) -> str:
    """Unpack ``data`` into the empty folder ``root``; return its format."""
    fmt = archive_format(data)
    budget = MAX_UNPACKED_BYTES
    try:
        if fmt == "zip":
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                infos = archive.infolist()
                if len(infos) > MAX_MEMBERS:
                    raise ArchiveError(f"more than {MAX_MEMBERS} members")
                if sum(i.file_size for i in infos) > MAX_UNPACKED_BYTES:
                    raise ArchiveError(f"unpacks to more than {MAX_UNPACKED_BYTES} bytes")
                for info in infos:
                    target = _target(root, info.filename)
                    mode = info.external_attr >> 16
                    if info.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    if mode and (mode & 0o170000) not in (0, 0o100000):
                        raise ArchiveError(f"{info.filename!r}: not a regular file (a link?)")
                    with archive.open(info) as source:
                        budget -= _copy(source, target, budget)
        else:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
                count = 0
                for member in archive:
                    count += 1
                    if count > MAX_MEMBERS:
                        raise ArchiveError(f"more than {MAX_MEMBERS} members")
                    target = _target(root, member.name)
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    if not member.isreg():
                        raise ArchiveError(f"{member.name!r}: not a regular file (a link?)")
                    if member.size > budget:
                        raise ArchiveError(f"unpacks to more than {MAX_UNPACKED_BYTES} bytes")
                    extracted = archive.extractfile(member)
                    if extracted is None:
                        raise ArchiveError(f"{member.name!r}: unreadable member")
                    budget -= _copy(extracted, target, budget)
    except FileExistsError as exc:
        raise ArchiveError(f"member {Path(str(exc.filename)).name!r} appears twice") from None
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, OSError) as exc:
        raise ArchiveError(f"corrupt {fmt} archive ({exc})") from None
    return fmt
