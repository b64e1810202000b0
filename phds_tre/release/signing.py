"""Site keys and Ed25519 signatures over a release manifest.

A site signs the canonical JSON bytes of its release manifest (sorted keys,
no whitespace, UTF-8, no NaN) with an Ed25519 key. ``signature.json`` holds
the signature, the raw public key (base64) and its key id, the sha256 of the
raw public key — so a reader can see who signed before deciding whether to
trust that key.

Key files are PEM: the private key PKCS#8 unencrypted, written with mode
0600, the public key SubjectPublicKeyInfo beside it with ``.pub`` appended.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "SIGNATURE_ALGORITHM",
    "KeyFileError",
    "canonical_json",
    "generate_key",
    "key_id",
    "load_private_key",
    "load_public_key",
    "public_key_b64",
    "public_key_path",
    "sign_manifest",
    "verify_manifest_signature",
]

SIGNATURE_ALGORITHM = "Ed25519"


class KeyFileError(ValueError):
    """A key file that cannot be written, read or used; one-line message."""


def canonical_json(value: Any) -> bytes:
    """The canonical bytes of a JSON value: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Ed25519PublicKey) -> str:
    """The key id: sha256 (hex) of the raw 32-byte public key."""
    return hashlib.sha256(_raw(public_key)).hexdigest()


def public_key_b64(public_key: Ed25519PublicKey) -> str:
    """The raw 32-byte public key in base64: how the hub registers a principal's key."""
    return base64.b64encode(_raw(public_key)).decode("ascii")


def public_key_path(private_path: str | Path) -> Path:
    """Where :func:`generate_key` writes the public key: the private key's path + ``.pub``."""
    path = Path(private_path)
    return path.with_name(path.name + ".pub")


def generate_key(path: str | Path) -> Ed25519PrivateKey:
    """Create a site key: PEM private key at ``path`` (mode 0600) and its public key at ``path.pub``.

    Existing files are never overwritten.
    """
    path = Path(path)
    pub = public_key_path(path)
    for existing in (path, pub):
        if existing.exists():
            raise KeyFileError(f"{existing}: already exists (not overwritten)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(private_pem)
        os.chmod(path, 0o600)  # whatever the umask
        fd = os.open(pub, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(public_pem)
    except OSError as exc:
        raise KeyFileError(
            f"{exc.filename or path}: cannot write key ({exc.strerror or exc})"
        ) from None
    return key


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Read a PEM Ed25519 private key (unencrypted PKCS#8), e.g. one :func:`generate_key` wrote."""
    data = _read(path, "private key")
    if b"PRIVATE KEY" not in data:
        raise KeyFileError(f"{path}: not a PEM private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFileError(f"{path}: the private key is encrypted (not supported)") from None
    except ValueError:
        raise KeyFileError(f"{path}: not a valid PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key ({type(key).__name__})")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Read an Ed25519 public key: PEM (``.pub`` of :func:`generate_key`) or raw 32 bytes in base64."""
    data = _read(path, "public key")
    if b"PRIVATE KEY" in data:
        raise KeyFileError(f"{path}: this is a private key; give the public key (.pub)")
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError:
            raise KeyFileError(f"{path}: not a valid PEM public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(f"{path}: not an Ed25519 key ({type(key).__name__})")
        return key
    try:
        raw = base64.b64decode(data.strip(), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError):
        raise KeyFileError(
            f"{path}: not a public key (expected PEM or base64 of 32 raw bytes)"
        ) from None


def sign_manifest(manifest: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """The ``signature.json`` document for ``manifest``."""
    public = key.public_key()
    return {
        "algorithm": SIGNATURE_ALGORITHM,
        "signed": "manifest.json",
        "canonicalisation": "JSON, sorted keys, no whitespace, UTF-8",
        "key_id": key_id(public),
        "public_key": base64.b64encode(_raw(public)).decode("ascii"),
        "signature": base64.b64encode(key.sign(canonical_json(manifest))).decode("ascii"),
    }


def verify_manifest_signature(
    manifest: Mapping[str, Any],
    signature: object,
    trusted_keys: Sequence[Ed25519PublicKey] | None = None,
) -> tuple[str | None, list[str]]:
    """Check ``signature`` (a parsed ``signature.json``) over ``manifest``.

    Returns the signing key's id (None when unreadable) and the problems found.
    With ``trusted_keys``, the signing key must be one of them.
    """
    if not isinstance(signature, Mapping):
        return None, ["signature.json: not a JSON object"]
    if signature.get("algorithm") != SIGNATURE_ALGORITHM:
        return None, [f"signature.json: algorithm is not {SIGNATURE_ALGORITHM}"]
    try:
        public = Ed25519PublicKey.from_public_bytes(
            base64.b64decode(str(signature.get("public_key", "")), validate=True)
        )
        raw_signature = base64.b64decode(str(signature.get("signature", "")), validate=True)
    except (binascii.Error, ValueError):
        return None, ["signature.json: the public key or the signature is not valid base64 Ed25519"]
    found_id = key_id(public)
    problems = []
    if signature.get("key_id") != found_id:
        problems.append("signature.json: key_id does not match its public key")
    try:
        public.verify(raw_signature, canonical_json(manifest))
    except InvalidSignature:
        problems.append(
            "signature: does not match manifest.json (the manifest or the signature was altered)"
        )
    if trusted_keys is not None and found_id not in {key_id(k) for k in trusted_keys}:
        problems.append(f"signature: signed by key {found_id}, which is not a trusted key")
    return found_id, problems
