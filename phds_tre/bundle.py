"""Study bundles: a notebook and its manifest, addressed by sha256 and signed by the researcher.

A bundle is ONE zip file holding exactly three members::

    manifest.json    the StudyManifest, canonical JSON (sorted keys, no whitespace, UTF-8)
    notebook.ipynb   the study notebook, byte for byte as the researcher wrote it
    signature.json   Ed25519 over the canonical manifest bytes, with the public key and its id

The zip is deterministic (members sorted, fixed timestamps, fixed attributes, no extra
fields, no comment), so the same inputs give the same bytes.

The study's address (its id) is the sha256 (hex) of the canonical manifest bytes. The
manifest holds the notebook's sha256, so the address covers the notebook too; the
signature covers the same bytes, so the researcher's key vouches for both.

Parameters are validated against the notebook's ``parameters`` cell when the bundle is
built (the shared ones, and each site's merged ones), so a bundle with a parameter the
notebook does not declare, or of the wrong type, cannot be made. :func:`verify_bundle`
checks everything again, reading the zip defensively (sizes checked before anything is
decompressed, no member names other than the three).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import re
import tempfile
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import nbformat
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from phds_tre.execute.parameters import ParameterError, validate_parameters
from phds_tre.release.signing import (
    canonical_json,
    key_id,
    sign_manifest,
    verify_manifest_signature,
)

__all__ = [
    "MANIFEST_MEMBER",
    "MAX_BUNDLE_BYTES",
    "MEMBERS",
    "NOTEBOOK_MEMBER",
    "SCHEMA",
    "SIGNATURE_MEMBER",
    "BundleError",
    "BundleVerification",
    "StudyBundle",
    "StudyManifest",
    "build_bundle",
    "read_bundle",
    "verify_bundle",
    "write_bundle",
]

SCHEMA = "phds.study/1"
NOTEBOOK_MEMBER = "notebook.ipynb"
MANIFEST_MEMBER = "manifest.json"
SIGNATURE_MEMBER = "signature.json"
#: The members of every bundle, in the order they are written (sorted).
MEMBERS = (MANIFEST_MEMBER, NOTEBOOK_MEMBER, SIGNATURE_MEMBER)

#: Largest bundle file, and largest sum of its uncompressed members.
MAX_BUNDLE_BYTES = 20 * 1024 * 1024
#: Largest uncompressed size of each member.
MAX_MEMBER_BYTES = {
    NOTEBOOK_MEMBER: MAX_BUNDLE_BYTES,
    MANIFEST_MEMBER: 1024 * 1024,
    SIGNATURE_MEMBER: 16 * 1024,
}

_SITE_RE = re.compile(r"[a-z0-9_]{1,64}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CREATED_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


class BundleError(ValueError):
    """A bundle that cannot be built, written or read; one-line message."""


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _utc_timestamp(value: str) -> str:
    if not _CREATED_RE.fullmatch(value):
        raise ValueError("must be a UTC time as YYYY-MM-DDTHH:MM:SSZ")
    try:
        dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        raise ValueError("is not a valid date and time") from None
    return value


def _site_names(value: list[str]) -> list[str]:
    for site in value:
        if not _SITE_RE.fullmatch(site):
            raise ValueError(f"site name {site!r} must match [a-z0-9_]{{1,64}}")
    if len(set(value)) != len(value):
        raise ValueError("a site is listed twice")
    return value


def _sha256_hex(value: str) -> str:
    if not _SHA256_RE.fullmatch(value):
        raise ValueError("must be 64 lower-case hex digits")
    return value


#: Field types shared by the signed documents (study manifests and round documents).
UtcTimestamp = Annotated[str, AfterValidator(_utc_timestamp)]
SiteNames = Annotated[list[str], Field(min_length=1), AfterValidator(_site_names)]
Sha256Hex = Annotated[str, AfterValidator(_sha256_hex)]


def check_site_parameters(
    sites: Sequence[str], parameters: Mapping[str, Any], site_parameters: Mapping[str, Any]
) -> None:
    """Per-site parameters name listed sites only; every parameter name is an identifier."""
    for site in site_parameters:
        if site not in sites:
            raise ValueError(f"site_parameters names site {site!r}, which is not in sites")
    for name in (n for group in (parameters, *site_parameters.values()) for n in group):
        if not name.isidentifier():
            raise ValueError(f"parameter name {name!r} is not a Python identifier")


class StudyManifest(BaseModel):
    """What a study is: its title, purpose, target sites, parameters and notebook hash."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    schema_: Literal["phds.study/1"] = Field(alias="schema")
    title: str = Field(min_length=1, max_length=500)
    purpose: str = Field(max_length=10_000)
    researcher: str = Field(min_length=1, max_length=200)
    created: UtcTimestamp
    sites: SiteNames
    parameters: dict[str, Any]
    site_parameters: dict[str, dict[str, Any]]
    notebook_sha256: Sha256Hex

    @field_validator("title", "researcher")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @model_validator(mode="after")
    def _parameter_names(self) -> StudyManifest:
        check_site_parameters(self.sites, self.parameters, self.site_parameters)
        return self

    def parameters_for(self, site: str) -> dict[str, Any]:
        """The parameters one site runs with: the shared ones, overridden by the site's own."""
        if site not in self.sites:
            raise BundleError(f"site {site!r} is not a target of this study")
        return {**self.parameters, **self.site_parameters.get(site, {})}

    def to_json(self) -> dict[str, Any]:
        """The manifest as a JSON document (``schema`` under its real name)."""
        return self.model_dump(mode="json", by_alias=True)

    def canonical_bytes(self) -> bytes:
        """The canonical JSON bytes: what is signed, stored and hashed for the study id."""
        try:
            return canonical_json(self.to_json())
        except ValueError as exc:  # NaN or infinity in a parameter
            raise BundleError(f"manifest: not representable as JSON ({exc})") from None


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "manifest"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


@dataclass(frozen=True)
class StudyBundle:
    """A built or read bundle: the notebook bytes, the manifest and its signature document."""

    notebook: bytes
    manifest: StudyManifest
    signature: Mapping[str, Any]

    @property
    def manifest_bytes(self) -> bytes:
        """The canonical manifest bytes (``manifest.json``)."""
        return self.manifest.canonical_bytes()

    @property
    def study_id(self) -> str:
        """The study's address: sha256 (hex) of the canonical manifest bytes."""
        return hashlib.sha256(self.manifest_bytes).hexdigest()

    @property
    def key_id(self) -> str:
        """The id of the key that signed the manifest (as ``signature.json`` states it)."""
        return str(self.signature.get("key_id", ""))

    def parameters_for(self, site: str) -> dict[str, Any]:
        """The merged parameters of one target site (see :meth:`StudyManifest.parameters_for`)."""
        return self.manifest.parameters_for(site)

    def to_bytes(self) -> bytes:
        """The bundle as deterministic zip bytes."""
        members = {
            MANIFEST_MEMBER: self.manifest_bytes,
            NOTEBOOK_MEMBER: self.notebook,
            SIGNATURE_MEMBER: canonical_json(dict(self.signature)),
        }
        return _zip_bytes(members)


def _zip_bytes(members: Mapping[str, bytes]) -> bytes:
    """Deterministic zip: sorted members, fixed time and attributes, no extra fields."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3
            info.external_attr = 0o100644 << 16
            archive.writestr(info, members[name], compresslevel=9)
    return buffer.getvalue()


def _read_notebook(data: bytes, where: str) -> nbformat.NotebookNode:
    try:
        return nbformat.reads(data.decode("utf-8"), as_version=4)
    except Exception as exc:  # nbformat raises many kinds for a malformed file
        message = " ".join(str(exc).split())[:200]
        raise BundleError(f"{where}: not a readable notebook ({message})") from None


def _validated_parameters(
    nb: nbformat.NotebookNode,
    shared: Mapping[str, object],
    per_site: Mapping[str, Mapping[str, object]],
    sites: Sequence[str],
) -> tuple[dict[str, object], dict[str, dict[str, object]]]:
    """Validate and convert the shared and per-site parameters; raise BundleError."""
    try:
        shared_values = validate_parameters(nb, dict(shared))
    except ParameterError as exc:
        raise BundleError(f"parameters: {exc}") from None
    site_values: dict[str, dict[str, object]] = {}
    for site in sites:
        own = per_site.get(site, {})
        try:
            converted = validate_parameters(nb, dict(own))
            validate_parameters(nb, {**shared_values, **converted})
        except ParameterError as exc:
            raise BundleError(f"site {site}: {exc}") from None
        if own:
            site_values[site] = converted
    return shared_values, site_values


def build_bundle(
    notebook_path: str | Path, manifest_fields: Mapping[str, Any], key: Ed25519PrivateKey
) -> StudyBundle:
    """Build and sign a study bundle for the notebook at ``notebook_path``.

    ``manifest_fields`` holds ``title``, ``sites``, ``researcher`` and optionally
    ``purpose``, ``parameters`` (name → value for every site), ``site_parameters``
    (site → name → value) and ``created`` (UTC, ``YYYY-MM-DDTHH:MM:SSZ``; default now).
    Values may be strings (as typed on a command line): they are converted to the type
    the notebook's ``parameters`` cell declares. Raises :class:`BundleError` (one line)
    for an unreadable notebook, an invalid manifest or a parameter the notebook refuses.
    """
    path = Path(notebook_path)
    try:
        notebook = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{path}: cannot read notebook ({exc.strerror or exc})") from None
    if len(notebook) > MAX_MEMBER_BYTES[NOTEBOOK_MEMBER]:
        raise BundleError(f"{path}: notebook is larger than {MAX_BUNDLE_BYTES} bytes")
    nb = _read_notebook(notebook, str(path))
    fields = dict(manifest_fields)
    for computed in ("notebook_sha256", "schema"):
        if computed in fields:
            raise BundleError(f"manifest field {computed!r} is computed, not given")
    fields.setdefault("created", _utc_now())
    fields.setdefault("purpose", "")
    fields.setdefault("parameters", {})
    fields.setdefault("site_parameters", {})
    fields["schema"] = SCHEMA
    fields["notebook_sha256"] = hashlib.sha256(notebook).hexdigest()
    try:
        draft = StudyManifest.model_validate(fields)
    except ValidationError as exc:
        raise BundleError(f"manifest: {_validation_message(exc)}") from None
    shared, per_site = _validated_parameters(
        nb, draft.parameters, draft.site_parameters, draft.sites
    )
    manifest = draft.model_copy(update={"parameters": shared, "site_parameters": per_site})
    signature = sign_manifest(manifest.to_json(), key)
    return StudyBundle(notebook=notebook, manifest=manifest, signature=signature)


def write_bundle(bundle: StudyBundle, path: str | Path) -> Path:
    """Write ``bundle`` as one zip file at ``path`` (atomically: all or nothing)."""
    target = Path(path)
    data = bundle.to_bytes()
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise BundleError(f"{target}: cannot write bundle ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise BundleError(f"{target}: cannot write bundle ({exc.strerror or exc})") from None
    return target


@dataclass(frozen=True)
class BundleVerification:
    """The outcome of :func:`verify_bundle`: ``ok`` when ``problems`` is empty."""

    ok: bool
    problems: list[str] = field(default_factory=list)
    study_id: str | None = None
    key_id: str | None = None
    #: True/False: the signing key is/is not trusted; None when no trusted keys were given.
    trusted: bool | None = None
    #: The bundle, when it is intact (whether or not its key is trusted).
    bundle: StudyBundle | None = None


def _shown(name: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)[:100]


def _unsafe_name(name: str) -> bool:
    return (
        not name
        or name.startswith("/")
        or "\\" in name
        or "/" in name
        or ".." in name
        or ":" in name
        or "\x00" in name
    )


def _members(archive: zipfile.ZipFile) -> tuple[dict[str, bytes], list[str]]:
    """Read the three members defensively; sizes are checked before decompressing."""
    problems: list[str] = []
    infos = archive.infolist()
    names = [info.filename for info in infos]
    for name in sorted(set(names)):
        if names.count(name) > 1:
            problems.append(f"member {_shown(name)!r} appears {names.count(name)} times")
        if name in MEMBERS:
            continue
        if _unsafe_name(name):
            problems.append(f"unsafe member name {_shown(name)!r} (path traversal)")
        else:
            problems.append(f"extra member {_shown(name)!r}")
    for name in MEMBERS:
        if name not in names:
            problems.append(f"missing member {name!r}")
    total = sum(info.file_size for info in infos)
    if total > MAX_BUNDLE_BYTES:
        problems.append(
            f"members are {total} bytes uncompressed, more than the limit of {MAX_BUNDLE_BYTES}"
        )
    for info in infos:
        if info.filename in MEMBERS and info.file_size > MAX_MEMBER_BYTES[info.filename]:
            problems.append(
                f"{info.filename}: {info.file_size} bytes uncompressed, more than the limit "
                f"of {MAX_MEMBER_BYTES[info.filename]}"
            )
        if info.flag_bits & 0x1:
            problems.append(f"{_shown(info.filename)}: encrypted member")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            problems.append(f"{_shown(info.filename)}: unsupported compression")
    if problems:
        return {}, problems
    data: dict[str, bytes] = {}
    for name in MEMBERS:
        limit = MAX_MEMBER_BYTES[name]
        try:
            with archive.open(name) as handle:
                content = handle.read(limit + 1)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
            problems.append(f"{name}: corrupt member ({exc})")
            continue
        if len(content) > limit:
            problems.append(f"{name}: larger than the limit of {limit} bytes")
            continue
        data[name] = content
    return data, problems


def _load_json(name: str, raw: bytes) -> tuple[Any, str | None]:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return None, f"{name}: not valid JSON ({exc})"
    return value, None


def _check(
    members: Mapping[str, bytes], trusted_keys: Sequence[Ed25519PublicKey] | None
) -> tuple[list[str], str | None, str | None, bool | None, StudyBundle | None]:
    problems: list[str] = []
    raw_manifest = members[MANIFEST_MEMBER]
    study_id = hashlib.sha256(raw_manifest).hexdigest()
    manifest_doc, error = _load_json(MANIFEST_MEMBER, raw_manifest)
    signature_doc, signature_error = _load_json(SIGNATURE_MEMBER, members[SIGNATURE_MEMBER])
    if error:
        return [error], study_id, None, None, None
    try:
        canonical = canonical_json(manifest_doc)
    except ValueError:
        canonical = b""
    if canonical != raw_manifest:
        problems.append(f"{MANIFEST_MEMBER}: not in canonical form (altered after signing)")
    key = None
    trusted: bool | None = None
    if signature_error:
        problems.append(signature_error)
    else:
        key, sig_problems = verify_manifest_signature(manifest_doc, signature_doc, trusted_keys)
        problems.extend(sig_problems)
        if trusted_keys is not None:
            trusted = key is not None and key in {key_id(k) for k in trusted_keys}
    manifest: StudyManifest | None = None
    try:
        manifest = StudyManifest.model_validate(manifest_doc)
    except ValidationError as exc:
        problems.append(f"{MANIFEST_MEMBER}: {_validation_message(exc)}")
    if manifest is not None and canonical == raw_manifest:
        try:
            same = manifest.canonical_bytes() == raw_manifest
        except BundleError:
            same = False
        if not same:
            problems.append(f"{MANIFEST_MEMBER}: does not round-trip as a study manifest")
    notebook = members[NOTEBOOK_MEMBER]
    notebook_sha = hashlib.sha256(notebook).hexdigest()
    if manifest is not None and manifest.notebook_sha256 != notebook_sha:
        problems.append(
            f"{NOTEBOOK_MEMBER}: sha256 {notebook_sha} does not match the manifest "
            f"({manifest.notebook_sha256}); the notebook was altered or swapped"
        )
    elif manifest is not None:
        try:
            nb = _read_notebook(notebook, NOTEBOOK_MEMBER)
            for site in manifest.sites:
                try:
                    validate_parameters(nb, manifest.parameters_for(site))
                except ParameterError as exc:
                    problems.append(f"{MANIFEST_MEMBER}: parameters of site {site}: {exc}")
        except BundleError as exc:
            problems.append(str(exc))
    bundle = None
    if manifest is not None and isinstance(signature_doc, Mapping):
        bundle = StudyBundle(notebook=notebook, manifest=manifest, signature=dict(signature_doc))
    return problems, study_id, key, trusted, bundle


def verify_bundle(
    bundle_or_path: StudyBundle | str | Path,
    trusted_keys: Sequence[Ed25519PublicKey] | None = None,
) -> BundleVerification:
    """Verify a bundle file (or a :class:`StudyBundle`, checked as the bytes it writes).

    Checks that the zip holds exactly the three members (no extra, missing, duplicate or
    path-traversal names; sizes within limits before anything is decompressed), that
    ``manifest.json`` is canonical JSON and a valid :class:`StudyManifest`, that the
    notebook's sha256 matches the manifest, that its parameters still validate against
    the notebook, that the Ed25519 signature verifies and, with ``trusted_keys``, that
    the signing key is one of them. Each problem is one sentence naming what is wrong.

    Raises :class:`BundleError` only for input that is not a bundle at all: a file that
    cannot be read or is not a zip.
    """
    if isinstance(bundle_or_path, StudyBundle):
        data = bundle_or_path.to_bytes()
        where = "bundle"
    else:
        path = Path(bundle_or_path)
        where = str(path)
        try:
            size = path.stat().st_size
            if size > MAX_BUNDLE_BYTES:
                return BundleVerification(
                    ok=False,
                    problems=[f"{where}: {size} bytes, more than the limit of {MAX_BUNDLE_BYTES}"],
                )
            data = path.read_bytes()
        except OSError as exc:
            raise BundleError(f"{where}: cannot read bundle ({exc.strerror or exc})") from None
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members, problems = _members(archive)
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as exc:
        raise BundleError(f"{where}: not a study bundle (not a zip file: {exc})") from None
    if problems:
        return BundleVerification(ok=False, problems=problems)
    problems, study_id, key, trusted, bundle = _check(members, trusted_keys)
    return BundleVerification(
        ok=not problems,
        problems=problems,
        study_id=study_id,
        key_id=key,
        trusted=trusted,
        bundle=bundle if not problems else None,
    )


def read_bundle(
    path: str | Path, trusted_keys: Sequence[Ed25519PublicKey] | None = None
) -> StudyBundle:
    """Read and verify the bundle at ``path``; raise :class:`BundleError` unless it is intact.

    With ``trusted_keys`` the signing key must also be one of them.
    """
    result = verify_bundle(path, trusted_keys)
    if not result.ok or result.bundle is None:
        raise BundleError(f"{path}: " + "; ".join(result.problems or ["not a valid bundle"]))
    return result.bundle
