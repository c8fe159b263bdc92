"""Tests for merge_mix.validate.metrics, calibration and drift: known answers, scipy as the
oracle, planted calibration gaps."""

import json
import math

import numpy as np
import pytest
import scipy.stats

from merge_mix.errors import MergeMixError
from merge_mix.validate import calibration as C
from merge_mix.validate import drift as D
from merge_mix.validate import metrics as M

DOMAINS = ("code", "web", "math")
N_BOOT = 300  # enough to exercise the bootstrap; keeps the file fast


@pytest.fixture(scope="module")
def weights() -> np.ndarray:
    """12 reference mixtures of 3 domains: vertices, edge midpoints, uniform, 5 random."""
    rng = np.random.default_rng(7)
    fixed = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0], [0, 0.5, 0.5], [0.5, 0, 0.5]]
    return np.vstack([fixed, [[1 / 3] * 3], rng.dirichlet([1, 1, 1], size=5)])


# --- correlations ----------------------------------------------------------------------------


def test_correlations_known_values_and_scipy():
    proxy, real = [1, 2, 3, 4, 5], [1, 3, 2, 5, 4]
    # 1 - 6 * sum d^2 / (n (n^2 - 1)) = 1 - 24 / 120; 8 concordant, 2 discordant pairs of 10.
    assert M.spearman(proxy, real, n_boot=N_BOOT).value == pytest.approx(0.8)
    assert M.kendall(proxy, real, n_boot=N_BOOT).value == pytest.approx(0.6)
    assert M.pearson(proxy, real, n_boot=N_BOOT).value == pytest.approx(0.8)

    rng = np.random.default_rng(0)
    x = rng.normal(size=15)
    y = x + rng.normal(size=15)
    y[3] = y[4]  # a tie, so tau-b's correction matters
    assert M.spearman(x, y).value == pytest.approx(scipy.stats.spearmanr(x, y)[0])
    assert M.kendall(x, y).value == pytest.approx(scipy.stats.kendalltau(x, y)[0])
    assert M.pearson(x, y).value == pytest.approx(scipy.stats.pearsonr(x, y)[0])


@pytest.mark.parametrize(
    ("kind", "oracle"),
    [
        ("spearman", scipy.stats.spearmanr),
        ("kendall", scipy.stats.kendalltau),
        ("pearson", scipy.stats.pearsonr),
    ],
)
def test_vectorised_bootstrap_statistic_equals_scipy(kind, oracle):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 5, size=9).astype(float)  # small integers: many ties
    y = x + rng.integers(0, 3, size=9)
    idx = rng.integers(0, 9, size=(60, 9))
    got = M._boot_stats(kind, x, y, idx)
    for row, value in zip(idx, got, strict=True):
        if np.ptp(x[row]) == 0 or np.ptp(y[row]) == 0:
            assert math.isnan(value)
        else:
            assert value == pytest.approx(oracle(x[row], y[row])[0], abs=1e-12)


def test_bootstrap_interval_contains_estimate_and_is_seeded():
    rng = np.random.default_rng(2)
    x = rng.normal(size=12)
    y = x + 0.7 * rng.normal(size=12)
    for fn in (M.spearman, M.kendall, M.pearson):
        a = fn(x, y, n_boot=N_BOOT, seed=3)
        assert a == fn(x, y, n_boot=N_BOOT, seed=3)
        assert a != fn(x, y, n_boot=N_BOOT, seed=4)
        assert a.low < a.value < a.high
        assert a.n == 12 and a.n_boot == N_BOOT


def test_interval_is_the_percentile_interval_of_scipy_on_resamples():
    rng = np.random.default_rng(6)
    x = rng.normal(size=10)
    y = x + rng.normal(size=10)
    idx = np.random.default_rng(11).integers(0, 10, size=(200, 10))
    stats = [scipy.stats.kendalltau(x[i], y[i])[0] for i in idx if np.ptp(x[i]) > 0]
    c = M.kendall(x, y, n_boot=200, seed=11, confidence=0.9)
    assert (c.low, c.high) == pytest.approx(tuple(np.percentile(stats, [5, 95])), abs=1e-12)


def test_degenerate_resamples_are_skipped():
    # With 3 distinct points a resample is constant only if it repeats one index 3 times.
    idx = np.random.default_rng(0).integers(0, 3, size=(N_BOOT, 3))
    expected = int(np.sum(np.ptp(idx, axis=1) > 0))
    assert expected < N_BOOT
    assert M.spearman([1, 2, 3], [1, 3, 2], n_boot=N_BOOT, seed=0).n_boot == expected


def test_perfect_and_reversed_ranking():
    real = np.array([2.0, 2.5, 3.1, 3.2, 4.0, 5.5])
    for fn in (M.spearman, M.kendall):
        assert fn(real + 1, real, n_boot=N_BOOT).value == pytest.approx(1.0)
        assert fn(-real, real, n_boot=N_BOOT).value == pytest.approx(-1.0)
    perfect = M.spearman(real + 1, real, n_boot=N_BOOT)
    assert perfect.low == perfect.high == 1.0
    assert M.regret(real + 1, real) == M.Regret(pick=0, best=0, absolute=0.0, relative=0.0)
    assert M.capability_recovery(real, 0, 5) == 1.0


def test_undefined_correlation_has_a_reason():
    c = M.spearman([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0])
    assert math.isnan(c.value) and c.reason == "proxy scores are all equal"
    assert M.pearson([1, 2], [2, 1]).reason == "needs at least 3 mixtures, got 2"
    assert c.as_dict()["value"] is None


# --- top quarter, regret, recovery -----------------------------------------------------------


def test_top_quarter_picks_the_best_references():
    real = np.array([3.0, 1.0, 4.0, 1.5, 5.0, 9.0, 2.0, 6.0, 5.5, 0.5, 8.0, 7.0])
    assert M.top_indices(real).tolist() == [9, 1, 3]
    assert M.top_indices(real, higher_is_better=True).tolist() == [5, 10, 11]
    # Inside the top three the proxy swaps the two best: Spearman over (9, 1, 3) is 0.5.
    proxy = real.copy()
    proxy[9], proxy[1] = 1.0, 0.5
    assert M.top_spearman(proxy, real, n_boot=N_BOOT).value == pytest.approx(0.5)
    assert M.spearman(proxy, real, n_boot=N_BOOT).value > 0.99


def test_top_quarter_of_too_few_references_is_nan():
    c = M.top_spearman(np.arange(8.0), np.arange(8.0))
    assert math.isnan(c.value)
    assert "is 2 mixtures; needs at least 3" in c.reason


def test_regret_recovery_and_gains_known_values():
    real = np.array([3.0, 2.0, 1.0, 2.5])  # 0 = uniform, 2 = best
    proxy = np.array([1.4, 1.0, 1.2, 1.3])  # proxy prefers mixture 1
    r = M.regret(proxy, real)
    assert (r.pick, r.best, r.absolute, r.relative) == (1, 2, 1.0, 1.0)
    assert M.capability_recovery(real, 1, 0) == pytest.approx(0.5)
    assert M.capability_recovery(real, 0, 3) == pytest.approx(-0.5 / 1.5)  # worse than baseline
    assert math.isnan(M.capability_recovery(real, 1, 2))  # baseline is already the best
    assert M.baseline_gain(real, 1, 0) == pytest.approx((1.0, 1 / 3))
    # Accuracies: the same numbers read the other way round.
    r = M.regret(-proxy, -real, higher_is_better=True)
    assert (r.pick, r.best, r.absolute) == (1, 2, 1.0)
    assert M.capability_recovery(-real, 1, 0, higher_is_better=True) == pytest.approx(0.5)


def test_aggregate_targets():
    agg = M.aggregate_targets({"a": [1.0, 4.0], "b": [3.0, 2.0]})
    assert agg["mean_loss"].tolist() == [2.0, 3.0]
    assert agg["worst_loss"].tolist() == [3.0, 4.0]
    acc = M.aggregate_targets({"a": [1.0, 4.0], "b": [3.0, 2.0]}, higher_is_better=True)
    assert acc["worst_loss"].tolist() == [1.0, 2.0]


# --- the table -------------------------------------------------------------------------------


def test_fidelity_table_shape_and_macro():
    real = {"heldout/a/loss": np.arange(1.0, 6.0), "heldout/b/loss": np.array([1, 3, 2, 5, 4.0])}
    proxy = {"heldout/a/loss": np.arange(1.0, 6.0) + 0.1, "heldout/b/loss": np.arange(1.0, 6.0)}
    real.update(M.aggregate_targets(real))
    proxy.update(M.aggregate_targets(proxy))
    mixtures = ["uniform", "m1", "m2", "natural", "m4"]
    table = M.fidelity_table(
        proxy, real, mixtures, baselines={"uniform": 0, "natural": 3}, n_boot=N_BOOT
    )
    json.dumps(table, allow_nan=False)
    assert set(table["targets"]) == set(real)
    a = table["targets"]["heldout/a/loss"]
    assert a["spearman"]["value"] == pytest.approx(1.0)
    assert a["regret"] == {"pick": "uniform", "best": "uniform", "absolute": 0.0, "relative": 0.0}
    assert a["capability_recovery"] is None  # the uniform mixture is itself the best
    assert a["top_spearman"]["mixtures"] == ["uniform", "m1"]
    assert "needs at least 3" in a["top_spearman"]["reason"]
    assert a["baselines"]["natural"] == {
        "mixture": "natural",
        "gain": 3.0,
        "relative_gain": 0.75,
        "recovery": 1.0,
    }
    macro = table["macro"]
    assert macro["targets"] == ["heldout/a/loss", "heldout/b/loss"]
    assert macro["spearman"]["value"] == pytest.approx(0.9)  # mean of 1.0 and 0.8
    assert macro["spearman"]["low"] <= 0.9 <= macro["spearman"]["high"]
    assert macro["kendall"] == pytest.approx(0.8)  # mean of 1.0 and 0.6


def test_macro_bootstrap_resamples_domains_jointly():
    real = {"a": [1.0, 2.0, 3.0, 4.0], "b": [1.0, 2.0, 3.0, 4.0]}
    proxy = {"a": [1.0, 2.0, 3.0, 4.0], "b": [1.0, 1.0, 1.0, 2.0]}
    macro = M.fidelity_table(proxy, real, "wxyz", n_boot=N_BOOT, seed=2)["macro"]
    # A resample counts only if no domain is constant in it; "b" needs index 3 and another.
    idx = np.random.default_rng(2).integers(0, 4, size=(N_BOOT, 4))
    b_varies = (idx == 3).any(axis=1) & (idx != 3).any(axis=1)
    assert macro["spearman"]["n_boot"] == int(b_varies.sum()) < N_BOOT
    expected = (1.0 + scipy.stats.spearmanr(proxy["b"], real["b"])[0]) / 2
    assert macro["spearman"]["value"] == pytest.approx(expected)


# --- calibration -----------------------------------------------------------------------------


def _planted(weights, gap):
    real = 2.0 + weights @ np.array([0.3, -0.2, 0.5]) + 0.1 * np.sin(7 * weights[:, 0])
    return {"mean_loss": real + gap}, {"mean_loss": real}


@pytest.mark.parametrize(
    ("form", "gap_of", "coefficients"),
    [
        ("constant", lambda w: 0.25 + 0 * w[:, 0], {"intercept": 0.25}),
        (
            "constant+entropy",
            lambda w: 0.3 + 0.5 * C.mixture_entropy(w),
            {"intercept": 0.3, "H(w)": 0.5},
        ),
        (
            "linear",
            lambda w: w @ np.array([0.1, 0.4, 0.7]),
            {"w[code]": 0.1, "w[web]": 0.4, "w[math]": 0.7},
        ),
        (
            "pairwise",
            lambda w: w @ np.array([0.1, 0.4, 0.7]) + 2.0 * w[:, 0] * w[:, 1] - w[:, 1] * w[:, 2],
            {
                "w[code]": 0.1,
                "w[web]": 0.4,
                "w[math]": 0.7,
                "w[code]*w[web]": 2.0,
                "w[code]*w[math]": 0.0,
                "w[web]*w[math]": -1.0,
            },
        ),
    ],
)
def test_calibration_recovers_planted_gap(weights, form, gap_of, coefficients):
    proxy, real = _planted(weights, gap_of(weights))
    cal = C.fit_calibration(weights, proxy, real, DOMAINS)
    fit = cal.gaps["mean_loss"]
    assert fit.form == form and fit.alpha == 0.0
    assert fit.coefficients == pytest.approx(coefficients, abs=1e-9)
    assert fit.loo_rmse < 1e-9
    calibrated = cal.apply(weights, proxy)["mean_loss"]
    np.testing.assert_allclose(calibrated, real["mean_loss"], atol=1e-9)
    one = cal.apply(weights[4], {"mean_loss": proxy["mean_loss"][4]})["mean_loss"]
    assert isinstance(one, float) and one == pytest.approx(real["mean_loss"][4])


def test_loo_calibration_repairs_an_entropy_gap(weights):
    # Real: mixing helps (concave in w). Proxy: a gap growing with entropy hides that.
    real_d = {d: 3.0 - 0.6 * np.sqrt(weights[:, i]) for i, d in enumerate(DOMAINS)}
    gap = 0.3 + 0.8 * C.mixture_entropy(weights)
    real = M.aggregate_targets(real_d)
    proxy = {k: v + gap for k, v in real.items()}
    del real["worst_loss"], proxy["worst_loss"]
    report = C.loo_fidelity(weights, proxy, real, DOMAINS, n_boot=N_BOOT)["mean_loss"]
    assert report["raw"]["spearman"]["value"] < -0.9
    assert report["calibrated"]["spearman"]["value"] == pytest.approx(1.0)
    assert report["calibrated"]["kendall"]["value"] == pytest.approx(1.0)
    assert report["calibrated"]["rmse"] < 1e-9 < report["raw"]["rmse"]
    assert report["forms"] == ["constant+entropy"] * len(weights)
    np.testing.assert_allclose(report["loo_proxy"], real["mean_loss"], atol=1e-9)


def test_loo_calibration_fits_on_one_split_and_judges_on_another(weights):
    """validate fits the gap on the search split and judges on the test split: a gap that
    is the same on both (planted) is removed from the test-split proxies exactly, whatever
    the test split's own real scores, and the fidelity reported is the test split's."""
    gap = 0.3 + 0.8 * C.mixture_entropy(weights)
    proxy_fit, real_fit = _planted(weights, gap)
    real_test = {"mean_loss": 2.5 - weights @ np.array([0.4, 0.1, -0.3])}
    proxy_test = {"mean_loss": real_test["mean_loss"] + gap}
    report = C.loo_fidelity(
        weights,
        proxy_fit,
        real_fit,
        DOMAINS,
        n_boot=N_BOOT,
        proxy_eval=proxy_test,
        real_eval=real_test,
    )["mean_loss"]
    np.testing.assert_allclose(report["loo_proxy"], real_test["mean_loss"], atol=1e-9)
    assert report["calibrated"]["spearman"]["value"] == pytest.approx(1.0)
    raw = M.spearman(proxy_test["mean_loss"], real_test["mean_loss"], n_boot=N_BOOT)
    assert report["raw"]["spearman"]["value"] == pytest.approx(raw.value)
    assert report["raw"]["rmse"] == pytest.approx(np.sqrt(np.mean(gap**2)))
    # A gap that differs between the splits is not removed: the test split says so.
    shifted = {"mean_loss": proxy_test["mean_loss"] + 0.1}
    moved = C.loo_fidelity(
        weights,
        proxy_fit,
        real_fit,
        DOMAINS,
        n_boot=N_BOOT,
        proxy_eval=shifted,
        real_eval=real_test,
    )["mean_loss"]
    assert moved["calibrated"]["rmse"] == pytest.approx(0.1, abs=1e-9)
    with pytest.raises(MergeMixError, match="give both proxy_eval and real_eval"):
        C.loo_fidelity(weights, proxy_fit, real_fit, DOMAINS, proxy_eval=proxy_test)


def test_a_planted_monotone_relation_has_rank_correlation_one():
    """proxy = exp(3 * real): perfectly ranked, not linear. Spearman and Kendall are 1 and
    their intervals collapse there; Pearson is below 1."""
    real = np.linspace(2.0, 3.0, 12) + 0.01 * np.sin(np.arange(12))
    proxy = np.exp(3 * real)
    for fn in (M.spearman, M.kendall):
        c = fn(proxy, real, n_boot=N_BOOT)
        assert (c.value, c.low, c.high) == pytest.approx((1.0, 1.0, 1.0))
    assert M.pearson(proxy, real, n_boot=N_BOOT).value < 0.999
    assert M.regret(proxy, real).absolute == 0.0


def test_noisy_gap_prefers_a_simple_form(weights):
    rng = np.random.default_rng(5)
    proxy, real = _planted(weights, 0.2 + 0.01 * rng.normal(size=len(weights)))
    fit = C.fit_calibration(weights, proxy, real, DOMAINS).gaps["mean_loss"]
    assert fit.form == "constant"
    assert fit.coefficients["intercept"] == pytest.approx(0.2, abs=0.01)
    assert set(fit.candidates) == set(C.FORMS)


def test_calibration_round_trips_through_json(weights):
    proxy, real = _planted(weights, 0.3 + 0.5 * C.mixture_entropy(weights))
    cal = C.fit_calibration(weights, proxy, real, DOMAINS, forms=["linear", "constant+entropy"])
    data = json.loads(json.dumps(cal.to_dict(), allow_nan=False))
    assert data["n_references"] == 12 and data["domains"] == list(DOMAINS)
    assert set(data["targets"]["mean_loss"]["candidates"]) == {"linear", "constant+entropy"}
    again = C.Calibration.from_dict(data)
    assert again == cal and again.target_names == ["mean_loss"]
    np.testing.assert_array_equal(
        again.apply(weights, proxy)["mean_loss"], cal.apply(weights, proxy)["mean_loss"]
    )


def test_too_few_references_skips_rich_forms(weights):
    proxy, real = _planted(weights[:5], 0.1)
    fit = C.fit_calibration(weights[:5], proxy, real, DOMAINS).gaps["mean_loss"]
    # 3 domains: linear needs 3 + 2 = 5 references, pairwise 6 + 2 = 8.
    assert fit.candidates["linear"] is not None
    assert fit.candidates["linear+entropy"] is None and fit.candidates["pairwise"] is None


# --- bad input -------------------------------------------------------------------------------


def test_bad_inputs_raise_with_a_useful_message(weights):
    proxy, real = _planted(weights, 0.1)
    with pytest.raises(MergeMixError, match="'pairwise' needs at least 8 references .* got 5"):
        C.fit_calibration(weights[:5], *_planted(weights[:5], 0.1), DOMAINS, forms=["pairwise"])
    with pytest.raises(MergeMixError, match="needs at least 3 references .* got 2"):
        C.fit_calibration(weights[:2], *_planted(weights[:2], 0.1), DOMAINS)
    with pytest.raises(MergeMixError, match="needs at least 4 references .* got 3"):
        C.loo_fidelity(weights[:3], *_planted(weights[:3], 0.1), DOMAINS)
    with pytest.raises(MergeMixError, match=r"expected \(n, 2\)"):
        C.fit_calibration(weights, proxy, real, DOMAINS[:2])
    with pytest.raises(MergeMixError, match="unknown calibration form 'cubic'"):
        C.fit_calibration(weights, proxy, real, DOMAINS, forms=["cubic"])
    off = weights.copy()
    off[2] *= 1.2
    with pytest.raises(MergeMixError, match="merge weights of mixture 2 .* sum to 1"):
        C.fit_calibration(off, proxy, real, DOMAINS)
    nan = {"mean_loss": real["mean_loss"].copy()}
    nan["mean_loss"][4] = np.nan
    with pytest.raises(MergeMixError, match="real 'mean_loss': mixture 4 has score nan"):
        C.fit_calibration(weights, proxy, nan, DOMAINS)
    with pytest.raises(MergeMixError, match="'worst_loss' has proxy scores but no counterpart"):
        M.fidelity_table({**proxy, "worst_loss": real["mean_loss"]}, real, list(range(12)))
    with pytest.raises(MergeMixError, match="at least 3 mixtures, got 2"):
        M.fidelity_table({"t": [1, 2]}, {"t": [1, 2]}, ["a", "b"])
    with pytest.raises(MergeMixError, match="baseline 'uniform' index 7"):
        M.fidelity_table({"t": [1, 2, 3]}, {"t": [1, 2, 3]}, "abc", baselines={"uniform": 7})

    cal = C.fit_calibration(weights, proxy, real, DOMAINS)
    with pytest.raises(MergeMixError, match="no target 'worst_loss'"):
        cal.apply(weights, {"worst_loss": real["mean_loss"]})
    data = cal.to_dict()
    del data["targets"]["mean_loss"]["coefficients"]["intercept"]
    with pytest.raises(MergeMixError, match="needs coefficients"):
        C.Calibration.from_dict(data)
    with pytest.raises(MergeMixError, match="malformed"):
        C.Calibration.from_dict({"domains": list(DOMAINS)})


# --- drift -----------------------------------------------------------------------------------


def test_relative_drift_known_value():
    base = [np.array([3.0, 0.0]), np.array([[4.0]])]  # ||base|| = 5
    comp = [np.array([3.0, 1.0]), np.array([[4.0]])]  # ||comp - base|| = 1
    assert D.relative_drift(base, comp) == pytest.approx(0.2)
    assert D.relative_drift(iter(base), iter(base)) == 0.0
    by_name = D.relative_drift({"a": base[0], "b": base[1]}, {"b": comp[1], "a": comp[0]})
    assert by_name == pytest.approx(0.2)


def test_relative_drift_streams_in_chunks(monkeypatch):
    monkeypatch.setattr(D, "_CHUNK", 3)
    rng = np.random.default_rng(0)
    base = [rng.normal(size=(4, 5)), rng.normal(size=7)]
    comp = [b + 0.1 * rng.normal(size=b.shape) for b in base]
    flat_b, flat_c = (
        np.concatenate([b.ravel() for b in base]),
        np.concatenate([c.ravel() for c in comp]),
    )
    expected = np.linalg.norm(flat_c - flat_b) / np.linalg.norm(flat_b)
    assert D.relative_drift(base, comp) == pytest.approx(expected, rel=1e-12)


def test_relative_drift_of_torch_tensors():
    torch = pytest.importorskip("torch")
    base = [torch.tensor([3.0, 0.0], dtype=torch.bfloat16), torch.tensor([[4.0]])]
    comp = [torch.tensor([3.0, 1.0], dtype=torch.bfloat16), np.array([[4.0]])]
    assert D.relative_drift(base, comp) == pytest.approx(0.2)


def test_relative_drift_bad_input():
    with pytest.raises(MergeMixError, match=r"tensor #1: base shape \(2,\) but component shape"):
        D.relative_drift([np.ones(1), np.ones(2)], [np.ones(1), np.ones(3)])
    with pytest.raises(MergeMixError, match="different numbers of tensors"):
        D.relative_drift([np.ones(2)], [np.ones(2), np.ones(2)])
    with pytest.raises(MergeMixError, match="tensor 'b' is in only one"):
        D.relative_drift({"a": np.ones(2)}, {"a": np.ones(2), "b": np.ones(2)})
    with pytest.raises(MergeMixError, match="all zero"):
        D.relative_drift([np.zeros(2)], [np.ones(2)])
