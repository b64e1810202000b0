"""Follow-up rounds of a study: new parameters for the same signed notebook, signed again.

An iterative federated algorithm (a GLM fitted by Newton steps) runs the same study
notebook many times, each time with the coordinator's new state. Round 1 is the study
bundle itself; every later round is a :class:`RoundDocument`::

    {"schema": "phds.round/1", "study_id": "<sha256 of the study manifest>", "round": 2,
     "sites": ["site_a", ...], "parameters": {...}, "site_parameters": {"site_a": {...}},
     "researcher": "dr_a", "created": "2026-05-04T10:00:00Z"}

signed with the researcher's Ed25519 key over its canonical JSON (the same signature
format as a study manifest). The study id covers the study manifest, which holds the
notebook's sha256, so a round can only ever run the notebook the sites already checked;
the hub (semi-trusted) stores and forwards the document but cannot change a parameter.

A site runs round N with the study's parameters for that site, overridden by the round's
shared parameters, overridden by the round's parameters for that site
(:meth:`RoundDocument.parameters_for`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import nbformat
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from phds_tre.bundle import (
    Sha256Hex,
    SiteNames,
    StudyManifest,
    UtcTimestamp,
    check_site_parameters,
)
from phds_tre.execute.parameters import ParameterError, validate_parameters
from phds_tre.release.signing import canonical_json, sign_manifest, verify_manifest_signature

__all__ = [
    "ROUND_SCHEMA",
    "RoundDocument",
    "RoundError",
    "SignedRound",
    "build_round",
    "check_round_parameters",
    "parse_round",
    "verify_round",
]

ROUND_SCHEMA = "phds.round/1"
#: Largest round number (a runaway loop stops long before a database column overflows).
MAX_ROUND = 10_000


class RoundError(ValueError):
    """A round document that cannot be built, or that does not verify; one-line message."""


class RoundDocument(BaseModel):
    """What round N of a study runs: which sites, with which parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    schema_: Literal["phds.round/1"] = Field(alias="schema")
    study_id: Sha256Hex
    round: int = Field(ge=2, le=MAX_ROUND)
    sites: SiteNames
    parameters: dict[str, Any]
    site_parameters: dict[str, dict[str, Any]]
    researcher: str = Field(min_length=1, max_length=200)
    created: UtcTimestamp

    @model_validator(mode="after")
    def _parameter_names(self) -> RoundDocument:
        check_site_parameters(self.sites, self.parameters, self.site_parameters)
        return self

    def to_json(self) -> dict[str, Any]:
        """The document as JSON data (``schema`` under its real name)."""
        return self.model_dump(mode="json", by_alias=True)

    def canonical_bytes(self) -> bytes:
        """What is signed: canonical JSON (sorted keys, no whitespace, UTF-8)."""
        try:
            return canonical_json(self.to_json())
        except ValueError as exc:  # NaN or infinity in a parameter
            raise RoundError(f"round: not representable as JSON ({exc})") from None

    def parameters_for(self, manifest: StudyManifest, site: str) -> dict[str, Any]:
        """The parameters ``site`` runs this round with (study's, then round's, then site's)."""
        if site not in self.sites:
            raise RoundError(f"round {self.round} does not name site {site!r}")
        return {
            **manifest.parameters_for(site),
            **self.parameters,
            **self.site_parameters.get(site, {}),
        }


@dataclass(frozen=True)
class SignedRound:
    """A round document and its ``signature`` (same format as a study's ``signature.json``)."""

    document: RoundDocument
    signature: Mapping[str, Any]

    @property
    def key_id(self) -> str:
        """The signing key's id as the signature states it."""
        return str(self.signature.get("key_id", ""))

    def to_json(self) -> dict[str, Any]:
        """``{"document": ..., "signature": ...}``: what is sent to the hub and stored."""
        return {"document": self.document.to_json(), "signature": dict(self.signature)}


def _message(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'round'}: {e['msg']}" for e in exc.errors()
    )


def parse_round(document: object) -> RoundDocument:
    """Validate round-document JSON data; :class:`RoundError` naming what is wrong."""
    try:
        return RoundDocument.model_validate(document)
    except ValidationError as exc:
        raise RoundError(f"round document: {_message(exc)}") from None


def check_round_parameters(
    document: RoundDocument, manifest: StudyManifest, notebook: nbformat.NotebookNode
) -> list[str]:
    """Problems with the round's parameters against the notebook's ``parameters`` cell.

    Every target site's merged parameters must validate: a name the notebook does not
    declare, or a value of the wrong type, is a problem naming the site and parameter.
    """
    problems = []
    for site in document.sites:
        if site not in manifest.sites:
            problems.append(f"site {site!r} is not one of the study's sites")
            continue
        try:
            validate_parameters(notebook, document.parameters_for(manifest, site))
        except ParameterError as exc:
            problems.append(f"site {site}: {exc}")
    return problems


def build_round(
    manifest: StudyManifest,
    notebook: nbformat.NotebookNode,
    number: int,
    key: Ed25519PrivateKey,
    *,
    parameters: Mapping[str, object] | None = None,
    site_parameters: Mapping[str, Mapping[str, object]] | None = None,
    sites: Sequence[str] | None = None,
    researcher: str | None = None,
) -> SignedRound:
    """Build and sign round ``number`` of the study with ``manifest`` (and its notebook).

    ``sites`` defaults to every site of the study. Values may be strings (as typed on a
    command line): they are converted to the types the notebook's ``parameters`` cell
    declares before signing, so the signed document holds what the sites will run.
    Raises :class:`RoundError` (one line) for an unknown site or a refused parameter.
    """
    study_id = hashlib.sha256(manifest.canonical_bytes()).hexdigest()
    targets = list(sites) if sites is not None else list(manifest.sites)
    outside = [s for s in targets if s not in manifest.sites]
    if outside:
        raise RoundError(f"not sites of the study: {', '.join(outside)}")
    try:
        shared = validate_parameters(notebook, dict(parameters or {}))
        own = {
            site: validate_parameters(notebook, dict(values))
            for site, values in (site_parameters or {}).items()
            if values
        }
    except ParameterError as exc:
        raise RoundError(f"parameters: {exc}") from None
    try:
        document = RoundDocument.model_validate(
            {
                "schema": ROUND_SCHEMA,
                "study_id": study_id,
                "round": number,
                "sites": targets,
                "parameters": shared,
                "site_parameters": own,
                "researcher": researcher or manifest.researcher,
                "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        )
    except ValidationError as exc:
        raise RoundError(f"round document: {_message(exc)}") from None
    problems = check_round_parameters(document, manifest, notebook)
    if problems:
        raise RoundError("parameters: " + "; ".join(problems))
    signature = {**sign_manifest(document.to_json(), key), "signed": "round document"}
    return SignedRound(document=document, signature=signature)


def verify_round(
    data: Mapping[str, Any],
    trusted_keys: Sequence[Ed25519PublicKey],
    *,
    study_id: str | None = None,
) -> SignedRound:
    """Verify ``{"document": ..., "signature": ...}``; the round, or :class:`RoundError`.

    The document must be a valid round document, and the Ed25519 signature over its
    canonical JSON must verify with one of ``trusted_keys``; with ``study_id`` the round
    must be of that study. Parameters are checked separately
    (:func:`check_round_parameters`), by whoever holds the notebook.
    """
    raw = data.get("document")
    signature = data.get("signature")
    document = parse_round(raw)
    try:
        same = canonical_json(raw) == document.canonical_bytes()
    except ValueError:
        same = False
    if not same:  # e.g. 2.0 given for an int: the signature would cover other bytes
        raise RoundError("round document: does not round-trip as canonical JSON")
    _, problems = verify_manifest_signature(document.to_json(), signature, trusted_keys)
    if problems:
        raise RoundError(
            "round document: "
            + "; ".join(p.replace("manifest.json", "the round document") for p in problems)
        )
    if study_id is not None and document.study_id != study_id:
        raise RoundError(f"the round is for study {document.study_id}, not {study_id}")
    assert isinstance(signature, Mapping)
    return SignedRound(document=document, signature=dict(signature))
