"""Site policies: TOML loading with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from phds_tre.sdc import DEFAULT_POLICY, Policy, PolicyError, load_policy
from phds_tre.sdc.policy import resolve_policy, set_active_policy


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_defaults_match_the_design() -> None:
    p = DEFAULT_POLICY
    assert (p.min_count, p.zeros_disclosive, p.nk_n, p.nk_k, p.p_ratio, p.min_dof) == (
        10,
        True,
        2,
        0.9,
        0.10,
        10,
    )
    assert p.rounding == "none"
    assert p.effective_protection == 10
    assert set(p.single_value_statistics) == {"min", "max", "mode", "first", "last"}


def test_load_full_policy(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
min_count = 5
zeros_disclosive = false
nk_n = 3
nk_k = 0.85
p_ratio = 0.2
min_dof = 20
rounding = "base5"
protection = 7
single_value_statistics = ["mode"]
median_min_count = 15
suppressed_verdict = "pass"
""",
    )
    p = load_policy(path)
    assert (
        p.min_count == 5 and p.nk_n == 3 and p.rounding == "base5" and p.effective_protection == 7
    )
    assert p.single_value_statistics == ("mode",)
    assert p.hash != DEFAULT_POLICY.hash


def test_policy_table_form(tmp_path: Path) -> None:
    assert load_policy(_write(tmp_path, "[policy]\nmin_count = 12\n")).min_count == 12


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("min_cuont = 5", "unknown key 'min_cuont'"),
        ('min_count = "ten"', "'min_count'"),
        ("min_count = 0", "'min_count'"),
        ("nk_k = 1.5", "'nk_k'"),
        ("p_ratio = -0.1", "'p_ratio'"),
        ('rounding = "base10"', "'rounding'"),
        ("zeros_disclosive = 1", "'zeros_disclosive'"),
        ('single_value_statistics = ["max", "variance"]', "single_value_statistics"),
        ("min_count = 5.5", "'min_count'"),
        ("min_count = [", "not valid TOML"),
    ],
)
def test_bad_policies_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message.replace("[", r"\[")) as info:
        load_policy(_write(tmp_path, text))
    assert str(tmp_path) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_policy(tmp_path / "nope.toml")


def test_hash_is_stable_and_sensitive() -> None:
    assert Policy().hash == DEFAULT_POLICY.hash
    assert Policy(min_count=11).hash != DEFAULT_POLICY.hash
    assert DEFAULT_POLICY.hash.startswith("sha256:")


def test_active_policy_is_used_when_none_given() -> None:
    site = Policy(min_count=20)
    set_active_policy(site)
    try:
        assert resolve_policy(None) is site
    finally:
        set_active_policy(None)
    assert resolve_policy(None) is DEFAULT_POLICY
    with pytest.raises(PolicyError):
        resolve_policy(42)  # type: ignore[arg-type]
