"""A hospital's whole policy: disclosure rules plus code gate, limits, scanning and release.

One TOML file per site (DESIGN.md, principle 5). The disclosure rules sit at the
top level, as for :func:`phds_tre.sdc.load_policy`, so a disclosure-only file is
also a valid site policy; the other concerns are tables::

    min_count = 10              # disclosure rules (phds_tre.sdc.Policy)

    [release]
    auto_release = ["pass"]     # verdicts released without a reviewer

    [code_gate]                 # per finding category: "allow" | "approve" | "block"
    network = "block"
    filesystem = "approve"

    [limits]
    cell_timeout_s = 120
    memory_mb = 4096

    [scan]
    identifier_columns = ["person.person_source_value", "person.birth_datetime"]

    [retention]
    executed_days = 30          # executed notebooks of finished runs are deleted after this

    [approval]
    later_rounds = "approve"    # or "auto": follow-up rounds of a study run here ran

Unknown keys, wrong types and out-of-range values are errors naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from phds_tre.sdc.policy import Policy, PolicyError, canonical_hash, read_policy_file

__all__ = [
    "CODE_GATE_CATEGORIES",
    "ApprovalPolicy",
    "CodeGatePolicy",
    "ExecutionLimits",
    "ReleasePolicy",
    "RetentionPolicy",
    "ScanPolicy",
    "SitePolicy",
    "load_site_policy",
]

GateAction = Literal["allow", "approve", "block"]
VerdictName = Literal["pass", "review", "fail"]

#: What the code gate looks for, one category per concern (see phds_tre.execute.codegate).
CODE_GATE_CATEGORIES = (
    "network",  # sockets, HTTP clients, urllib, ftplib, smtplib …
    "subprocess",  # os.system, subprocess, pty, multiprocessing spawning programs
    "filesystem",  # open()/pathlib/shutil outside the run's folder, os.remove …
    "dynamic_code",  # exec, eval, compile, __import__, importlib
    "shell",  # ! shell escapes and %%bash-like cell magics
    "magic",  # other IPython magics
    "display_tampering",  # IPython display/formatter machinery, sys.displayhook, kernel internals
    "phds_tampering",  # touching phds_tre's own modules or their attributes
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ReleasePolicy(_Strict):
    """Which verdicts leave without a reviewer."""

    auto_release: tuple[VerdictName, ...] = ("pass",)


class CodeGatePolicy(_Strict):
    """What each category of code-gate finding does: allow, need approval, or block the run."""

    network: GateAction = "block"
    subprocess: GateAction = "block"
    filesystem: GateAction = "approve"
    dynamic_code: GateAction = "block"
    shell: GateAction = "block"
    magic: GateAction = "approve"
    display_tampering: GateAction = "block"
    phds_tampering: GateAction = "block"

    def action(self, category: str) -> GateAction:
        """The action for a finding category (unknown categories need approval)."""
        if category not in CODE_GATE_CATEGORIES:
            return "approve"
        action: GateAction = getattr(self, category)
        return action


class ExecutionLimits(_Strict):
    """Limits of one run in the site's sandbox."""

    cell_timeout_s: float = Field(120.0, gt=0, le=86_400)
    run_timeout_s: float = Field(1800.0, gt=0, le=7 * 86_400)
    memory_mb: int = Field(4096, ge=64, le=1_048_576)
    output_bytes: int = Field(2_000_000, ge=1_000, le=1_000_000_000)
    network: Literal["deny", "allow"] = "deny"


class ScanPolicy(_Strict):
    """Which columns of the site's data hold identifiers that must never appear in an output."""

    identifier_columns: tuple[str, ...] = ("person.person_source_value", "person.birth_datetime")


class RetentionPolicy(_Strict):
    """How long the node keeps executed notebooks (row-level risk) of finished runs.

    run.json, the release and the audit trail are kept; runs awaiting review never expire.
    """

    executed_days: int = Field(30, ge=0, le=36_500)


class ApprovalPolicy(_Strict):
    """Whether a study's follow-up rounds (same notebook, new parameters) need fresh approval.

    ``auto``: a later round runs without the site admin when the study's round 1 ran at
    this site and the code gate finds nothing needing approval; ``approve``: every later
    round waits for the site admin, like a new study.
    """

    later_rounds: Literal["auto", "approve"] = "approve"


class SitePolicy(_Strict):
    """Everything a site decides: disclosure rules and the rest."""

    disclosure: Policy = Policy()
    release: ReleasePolicy = ReleasePolicy()
    code_gate: CodeGatePolicy = CodeGatePolicy()
    limits: ExecutionLimits = ExecutionLimits()
    scan: ScanPolicy = ScanPolicy()
    approval: ApprovalPolicy = ApprovalPolicy()
    retention: RetentionPolicy = RetentionPolicy()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data, every field present."""
        data = self.model_dump(mode="json")
        data["disclosure"] = self.disclosure.to_dict()
        return data

    @property
    def hash(self) -> str:
        """sha256 of the canonical JSON form of the whole site policy."""
        return canonical_hash(self.to_dict())

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str = "policy") -> SitePolicy:
        """Validate parsed TOML: disclosure keys at top level, other concerns as tables."""
        data = dict(data)
        if "policy" in data and isinstance(data["policy"], dict):
            data = {**data.pop("policy"), **data}
        sections: dict[str, Any] = {}
        for name, model in (
            ("release", ReleasePolicy),
            ("code_gate", CodeGatePolicy),
            ("limits", ExecutionLimits),
            ("scan", ScanPolicy),
            ("approval", ApprovalPolicy),
            ("retention", RetentionPolicy),
        ):
            section = data.pop(name, {})
            if not isinstance(section, dict):
                raise PolicyError(f"{source}: [{name}] must be a table")
            section = {k: tuple(v) if isinstance(v, list) else v for k, v in section.items()}
            try:
                sections[name] = model.model_validate(section)
            except ValidationError as exc:
                problems = "; ".join(
                    f"'{name}.{'.'.join(str(p) for p in e['loc'])}': {e['msg']}"
                    for e in exc.errors()
                )
                raise PolicyError(f"{source}: {problems}") from None
        return cls(disclosure=Policy.from_mapping(data, source), **sections)


def load_site_policy(path: str | Path | None) -> SitePolicy:
    """Load a site policy file; ``None`` gives the defaults."""
    if path is None:
        return SitePolicy()
    return SitePolicy.from_mapping(read_policy_file(path), source=str(path))
