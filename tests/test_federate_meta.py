"""Meta-analysis: defining equations, statsmodels, metafor's BCG example, truncation, validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import optimize, stats
from statsmodels.stats.meta_analysis import combine_effects

from phds_tre import federate
from phds_tre.federate.meta import MetaAnalysis, meta_analysis

# metafor's dat.bcg (Colditz et al. 1994): tpos, tneg, cpos, cneg of 13 BCG vaccine trials.
BCG = np.array(
    [
        [4, 119, 11, 128],
        [6, 300, 29, 274],
        [3, 228, 11, 209],
        [62, 13536, 248, 12619],
        [33, 5036, 47, 5761],
        [180, 1361, 372, 1079],
        [8, 2537, 10, 619],
        [505, 87886, 499, 87892],
        [29, 7470, 45, 7232],
        [17, 1699, 65, 1600],
        [186, 50448, 141, 27197],
        [5, 2493, 3, 2338],
        [27, 16886, 29, 17825],
    ],
    dtype=float,
)


def bcg_log_risk_ratios() -> tuple[np.ndarray, np.ndarray]:
    """metafor's escalc(measure="RR"): log risk ratio and its large-sample variance."""
    tpos, tneg, cpos, cneg = BCG.T
    yi = np.log(tpos / (tpos + tneg)) - np.log(cpos / (cpos + cneg))
    vi = 1 / tpos - 1 / (tpos + tneg) + 1 / cpos - 1 / (cpos + cneg)
    return yi, vi


def heterogeneous(seed: int, k: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Effects with clear between-site heterogeneity (Q > df), checked by the callers."""
    rng = np.random.default_rng(seed)
    v = rng.uniform(0.01, 0.2, k)
    y = 0.3 + rng.normal(0, 0.5, k) + rng.normal(0, np.sqrt(v))
    return y, v


# ---- metafor's published BCG results -----------------------------------------


def test_bcg_reml_matches_metafor() -> None:
    # metafor: rma(yi, vi, data=dat) -> estimate -0.7145, se 0.1798, tau^2 0.3132,
    # I^2 92.22%, H^2 12.86, Q(df = 12) = 152.2330
    y, v = bcg_log_risk_ratios()
    ma = meta_analysis(y, v, method="reml")
    assert round(ma.estimate, 4) == -0.7145
    assert round(ma.se, 4) == 0.1798
    assert round(ma.tau2, 4) == 0.3132
    assert round(100 * ma.i2, 2) == 92.22
    assert round(ma.h2, 2) == 12.86
    assert round(ma.q, 4) == 152.2330
    assert ma.q_df == 12
    assert ma.ci == pytest.approx((-1.0669, -0.3622), abs=5e-5)


def test_bcg_dl_and_fixed_match_metafor() -> None:
    # metafor: rma(..., method="DL") -> -0.7141, se 0.1787, tau^2 0.3088, I^2 92.12%;
    # rma(..., method="FE") -> -0.4303, se 0.0405
    y, v = bcg_log_risk_ratios()
    dl = meta_analysis(y, v, method="dl")
    assert round(dl.estimate, 4) == -0.7141
    assert round(dl.se, 4) == 0.1787
    assert round(dl.tau2, 4) == 0.3088
    assert round(100 * dl.i2, 2) == 92.12
    fe = meta_analysis(y, v, method="fixed")
    assert round(fe.estimate, 4) == -0.4303
    assert round(fe.se, 4) == 0.0405
    assert fe.tau2 == 0.0
    assert fe.prediction_interval is None


# ---- the defining equations at the estimate ----------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_dl_equals_its_closed_form(seed: int) -> None:
    y, v = heterogeneous(seed)
    w = 1 / v
    mu_fe = np.sum(w * y) / np.sum(w)
    q = np.sum(w * (y - mu_fe) ** 2)
    tau2 = max(0.0, (q - (len(y) - 1)) / (np.sum(w) - np.sum(w**2) / np.sum(w)))
    ws = 1 / (v + tau2)
    ma = meta_analysis(y, v, method="dl")
    assert ma.tau2 == pytest.approx(tau2, rel=1e-10, abs=1e-14)
    assert ma.estimate == pytest.approx(np.sum(ws * y) / np.sum(ws), rel=1e-10)
    assert ma.se == pytest.approx(1 / math.sqrt(np.sum(ws)), rel=1e-10)
    assert ma.q == pytest.approx(q, rel=1e-10)
    assert ma.i2 == pytest.approx((q - (len(y) - 1)) / q, rel=1e-10)
    assert sum(ma.weights) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_reml_score_is_zero_at_the_estimate(seed: int) -> None:
    y, v = heterogeneous(seed)
    ma = meta_analysis(y, v, method="reml")
    assert ma.tau2 > 0
    w = 1 / (v + ma.tau2)
    mu = np.sum(w * y) / np.sum(w)
    score = np.sum(w**2 * (y - mu) ** 2) - np.sum(w) + np.sum(w**2) / np.sum(w)
    assert abs(score) <= 1e-10 * np.sum(w)
    assert ma.estimate == pytest.approx(mu, rel=1e-12)

    # And it is the maximum of the restricted log-likelihood, found independently.
    def neg_restricted_loglik(t: float) -> float:
        ww = 1 / (v + t)
        m = np.sum(ww * y) / np.sum(ww)
        return 0.5 * (np.sum(np.log(v + t)) + math.log(np.sum(ww)) + np.sum(ww * (y - m) ** 2))

    best = optimize.minimize_scalar(
        neg_restricted_loglik, bounds=(0, 10), method="bounded", options={"xatol": 1e-12}
    )
    assert ma.tau2 == pytest.approx(best.x, rel=1e-5)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_paule_mandel_generalised_q_equals_k_minus_1(seed: int) -> None:
    y, v = heterogeneous(seed)
    ma = meta_analysis(y, v, method="pm")
    w = 1 / (v + ma.tau2)
    mu = np.sum(w * y) / np.sum(w)
    assert np.sum(w * (y - mu) ** 2) == pytest.approx(len(y) - 1, rel=1e-10)


# ---- statsmodels where it agrees (Q > df) ------------------------------------


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_matches_statsmodels_combine_effects_when_q_exceeds_df(seed: int) -> None:
    y, v = heterogeneous(seed, k=10)
    fe = meta_analysis(y, v, method="fixed")
    assert fe.q > fe.q_df  # statsmodels only agrees with the truncated DL here
    sm = combine_effects(y, v, method_re="chi2")  # chi2 = DerSimonian-Laird
    dl = meta_analysis(y, v, method="dl")
    assert fe.estimate == pytest.approx(sm.mean_effect_fe, rel=1e-10)
    assert fe.se == pytest.approx(sm.sd_eff_w_fe, rel=1e-10)
    assert fe.q == pytest.approx(sm.q, rel=1e-10)
    assert dl.tau2 == pytest.approx(sm.tau2, rel=1e-10)
    assert dl.estimate == pytest.approx(sm.mean_effect_re, rel=1e-10)
    assert dl.se == pytest.approx(sm.sd_eff_w_re, rel=1e-10)
    assert dl.i2 == pytest.approx(sm.i2, rel=1e-10)
    # statsmodels' "random effect wls" is the Knapp-Hartung standard error (untruncated).
    dl_hk = meta_analysis(y, v, method="dl", hksj=True)
    assert dl_hk.se == pytest.approx(sm.sd_eff_w_re_hksj, rel=1e-10)
    # method_re="iterated" is Paule-Mandel (its iteration solves Q(tau2) = k - 1); its
    # default stopping rule is atol=1e-5 on that equation, so tighten it to compare.
    sm_pm = combine_effects(y, v, method_re="iterated", atol=1e-11, maxiter=1000)
    pm = meta_analysis(y, v, method="pm")
    assert pm.tau2 == pytest.approx(sm_pm.tau2, rel=1e-10)
    assert pm.estimate == pytest.approx(sm_pm.mean_effect_re, rel=1e-10)
    assert pm.se == pytest.approx(sm_pm.sd_eff_w_re, rel=1e-10)


# ---- truncation at zero ------------------------------------------------------


def test_tau2_is_truncated_at_zero_when_q_below_df() -> None:
    v = np.array([0.04, 0.09, 0.05, 0.12, 0.07])
    y = np.array([0.20, 0.22, 0.19, 0.21, 0.20])  # far less spread than the variances allow
    fe = meta_analysis(y, v, method="fixed")
    assert fe.q < fe.q_df
    for method in ("dl", "reml", "pm"):
        ma = meta_analysis(y, v, method=method)
        assert ma.tau2 == 0.0, method
        assert ma.i2 == 0.0
        assert ma.estimate == pytest.approx(fe.estimate, rel=1e-14)
        assert ma.se == pytest.approx(fe.se, rel=1e-14)
    # statsmodels 0.15 leaves the DL tau^2 negative here: the reason we truncate ourselves.
    with np.errstate(invalid="ignore"):  # its HKSJ variance goes negative with that tau^2
        assert combine_effects(y, v, method_re="chi2").tau2 < 0


# ---- HKSJ --------------------------------------------------------------------


def test_hksj_uses_t_on_k_minus_1_df_without_truncation() -> None:
    y, v = bcg_log_risk_ratios()
    ma = meta_analysis(y, v, method="reml", hksj=True)
    w = 1 / (v + ma.tau2)
    se = math.sqrt(np.sum(w * (y - ma.estimate) ** 2) / ((len(y) - 1) * np.sum(w)))
    assert ma.se == pytest.approx(se, rel=1e-12)
    assert ma.df == 12
    assert ma.t == ma.statistic and ma.z is None
    crit = stats.t.ppf(0.975, 12)
    assert ma.ci == pytest.approx((ma.estimate - crit * se, ma.estimate + crit * se), rel=1e-12)
    assert ma.pvalue == pytest.approx(2 * stats.t.sf(abs(ma.estimate / se), 12), rel=1e-10)

    # Homogeneous sites: the Knapp-Hartung factor is below 1 and is NOT raised to 1.
    yh = np.array([0.20, 0.22, 0.19, 0.21, 0.20])
    vh = np.array([0.04, 0.09, 0.05, 0.12, 0.07])
    plain = meta_analysis(yh, vh, method="dl")
    hk = meta_analysis(yh, vh, method="dl", hksj=True)
    assert hk.se < plain.se
    assert any("no ad hoc truncation" in note for note in hk.notes)


# ---- results and validation --------------------------------------------------


def test_result_is_complete_and_serialisable() -> None:
    y, v = bcg_log_risk_ratios()
    ma = federate.meta_analysis(y, v, method="reml", labels=[f"trial {i}" for i in range(13)])
    assert isinstance(ma, MetaAnalysis)
    assert ma.k == 13 and ma.tau == pytest.approx(math.sqrt(ma.tau2))
    assert ma.z == ma.statistic and ma.t is None
    lo, hi = ma.prediction_interval or (0.0, 0.0)
    half = stats.norm.ppf(0.975) * math.sqrt(ma.tau2 + ma.se**2)
    assert (lo, hi) == pytest.approx((ma.estimate - half, ma.estimate + half), rel=1e-12)
    data = json.loads(json.dumps(ma.to_dict(), allow_nan=False))
    assert data["labels"][0] == "trial 0" and data["statistic_name"] == "z"
    text = ma.summary()
    assert "REML" in text and "-0.7145" in text and "trial 12" in text
    with pytest.raises(AttributeError):
        ma.estimate = 0.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("effects", "variances", "kwargs", "message"),
    [
        ([0.1, 0.2], [0.1], {}, "2 effects but 1 variances"),
        ([0.1, 0.2], [0.1, 0.0], {}, "variances must be finite and > 0"),
        ([0.1, 0.2], [0.1, float("nan")], {}, "site(s) 2"),
        ([0.1, float("inf")], [0.1, 0.1], {}, "effects must be finite"),
        ([0.1], [0.1], {"method": "reml"}, "at least 2 sites"),
        ([0.1], [0.1], {"method": "fixed", "hksj": True}, "HKSJ needs at least 2 sites"),
        ([0.1, 0.2], [0.1, 0.1], {"method": "bayes"}, "unknown method 'bayes'"),
        ([0.1, 0.2], [0.1, 0.1], {"level": 95}, "level must be between 0 and 1"),
        ([0.1, 0.2], [0.1, 0.1], {"labels": ["a"]}, "1 labels for 2 sites"),
        ([], [], {}, "no sites"),
    ],
)
def test_bad_input_is_a_clear_error(
    effects: list[float], variances: list[float], kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        meta_analysis(effects, variances, **kwargs)  # type: ignore[arg-type]


def test_single_site_fixed_effect_is_that_site() -> None:
    ma = meta_analysis([0.4], [0.01], method="fixed")
    assert ma.estimate == 0.4 and ma.se == pytest.approx(0.1)
