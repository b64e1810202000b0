"""A site's disclosure policy: the rules' thresholds, loaded from TOML.

Every hospital publishes its own policy file (DESIGN.md, principle 5). The
policy is a pydantic model so that a typo in a site's file (an unknown key, a
string where a number belongs, a ratio above 1) is a clear error naming the
key, never a silently ignored setting.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "DEFAULT_POLICY",
    "Policy",
    "PolicyError",
    "canonical_hash",
    "load_policy",
    "resolve_policy",
]

Rounding = Literal["none", "base5", "midpoint6"]
Verdict = Literal["pass", "review", "fail"]
SingleValueStatistic = Literal["min", "max", "mode", "first", "last", "median"]


def canonical_hash(data: object) -> str:
    """``sha256:<hex>`` of the canonical JSON form of ``data`` (sorted keys, no spaces)."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


class PolicyError(ValueError):
    """A policy file or value that cannot be used; the message names the key."""


class Policy(BaseModel):
    """The disclosure rules of one site.

    Conventions at each boundary (see docs/rules.md):

    * ``min_count``: a cell *fails* when ``0 < n < min_count`` (n = contributors);
      ``n == min_count`` passes.
    * ``zeros_disclosive``: a cell with ``n == 0`` fails when true.
    * NK dominance: fails when the top ``nk_n`` contributors hold ``>= nk_k`` of
      the cell total.
    * p% rule: fails when ``(total - x1 - x2) / x1 < p_ratio``; equality passes.
    * ``min_dof``: a model fails when residual degrees of freedom ``< min_dof``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    min_count: int = Field(10, ge=1, le=1_000_000)
    zeros_disclosive: bool = True
    nk_n: int = Field(2, ge=1, le=10)
    nk_k: float = Field(0.9, gt=0.0, le=1.0)
    p_ratio: float = Field(0.10, ge=0.0, le=1.0)
    min_dof: int = Field(10, ge=0, le=1_000_000)
    rounding: Rounding = "none"
    protection: int | None = Field(None, ge=0, le=1_000_000)
    single_value_statistics: tuple[SingleValueStatistic, ...] = (
        "min",
        "max",
        "mode",
        "first",
        "last",
    )
    median_min_count: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="a median over fewer contributors than this counts as one person's value",
    )
    suppressed_verdict: Literal["pass", "review"] = Field(
        "review",
        description="verdict of a table whose unsafe cells were suppressed (primary and secondary)",
    )

    @model_validator(mode="before")
    @classmethod
    def _lists_to_tuples(cls, data: object) -> object:
        # TOML arrays arrive as lists; strict mode would refuse them for a tuple field.
        if isinstance(data, dict) and isinstance(data.get("single_value_statistics"), list):
            data = {**data, "single_value_statistics": tuple(data["single_value_statistics"])}
        return data

    @property
    def effective_protection(self) -> int:
        """Width that the interval of a suppressed count must have (defaults to ``min_count``)."""
        return self.min_count if self.protection is None else self.protection

    def to_dict(self) -> dict[str, object]:
        """The policy as plain JSON-ready data, every field present."""
        data = self.model_dump(mode="json")
        data["single_value_statistics"] = list(self.single_value_statistics)
        return data

    @property
    def hash(self) -> str:
        """sha256 of the canonical JSON form: names the exact rules an output was checked with."""
        return canonical_hash(self.to_dict())

    @classmethod
    def from_mapping(cls, data: dict[str, object], source: str = "policy") -> Policy:
        """Validate a mapping (e.g. parsed TOML), turning pydantic's errors into one clear message."""
        if "policy" in data and isinstance(data["policy"], dict) and len(data) == 1:
            data = data["policy"]  # accept a [policy] table as well as top-level keys
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise PolicyError(_describe(exc, source)) from None


def _describe(exc: ValidationError, source: str) -> str:
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            known = ", ".join(Policy.model_fields)
            problems.append(f"unknown key '{key}' (known keys: {known})")
        else:
            problems.append(f"'{key}': {err['msg']} (got {err.get('input')!r})")
    return f"{source}: " + "; ".join(problems)


def read_policy_file(path: str | Path) -> dict[str, Any]:
    """The parsed TOML of a policy file; :class:`PolicyError` when unreadable or not TOML."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read policy file ({exc.strerror})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path}: not valid TOML ({exc})") from None


def load_policy(path: str | Path) -> Policy:
    """Load a site policy from a TOML file; raise :class:`PolicyError` with the key at fault."""
    return Policy.from_mapping(read_policy_file(path), source=str(path))


DEFAULT_POLICY = Policy()

_active: Policy | None = None


def set_active_policy(policy: Policy | None) -> None:
    """Set the policy used when an analysis call passes none (the site executor does this)."""
    global _active
    _active = policy


def resolve_policy(policy: Policy | str | Path | None) -> Policy:
    """The policy for one call: explicit, else the site's active one, else the defaults."""
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, (str, Path)):
        return load_policy(policy)
    if policy is None:
        return _active if _active is not None else DEFAULT_POLICY
    raise PolicyError(
        f"policy must be a Policy, a path to a TOML file or None, not {type(policy).__name__}"
    )
