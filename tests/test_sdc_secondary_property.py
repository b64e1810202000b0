"""Property: every table the safe API publishes with margins survives the exact LP audit."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phds_tre import sdc
from phds_tre.sdc import Policy


@st.composite
def cohorts(draw: Any) -> pd.DataFrame:
    n = draw(st.integers(5, 400))
    rows = draw(st.integers(2, 6))
    cols = draw(st.integers(2, 5))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # skewed category probabilities make small cells common
    p_rows = rng.dirichlet(np.full(rows, 0.6))
    p_cols = rng.dirichlet(np.full(cols, 0.6))
    return pd.DataFrame(
        {
            "r": rng.choice([f"r{i}" for i in range(rows)], n, p=p_rows),
            "s": rng.choice(["F", "M"], n),
            "c": rng.choice([f"c{i}" for i in range(cols)], n, p=p_cols),
            "los": rng.gamma(1.5, 4.0, n).round(1),
        }
    )


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(df=cohorts(), multi=st.booleans(), protection=st.sampled_from([None, 5, 15]))
def test_count_tables_with_margins_survive_the_audit(
    df: pd.DataFrame, multi: bool, protection: int | None
) -> None:
    policy = Policy(protection=protection)
    index = [df.r, df.s] if multi else df.r  # n-D: MultiIndex rows
    out = sdc.crosstab(index, df.c, margins=True, policy=policy)
    audit = out.audit()
    assert len(audit) == int(out.suppressed.to_numpy().sum())
    assert audit["protected"].all(), audit[~audit["protected"]]
    assert (audit["width"] >= policy.effective_protection - 1e-9).all()
    # nothing below the threshold is published
    truth = pd.crosstab(index, df.c, margins=True)
    published = out.table.to_numpy(dtype=float)
    small = (truth.to_numpy() > 0) & (truth.to_numpy() < policy.min_count)
    assert np.isnan(published[small]).all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(df=cohorts())
def test_sum_tables_with_margins_survive_the_audit(df: pd.DataFrame) -> None:
    out = sdc.pivot_table(df, values="los", index="r", columns="c", aggfunc="sum", margins=True)
    audit = out.audit()
    assert audit["protected"].all(), audit[~audit["protected"]]
