"""How faithfully merged proxies rank data mixtures, and how to calibrate them.

The `validate` stage trains a few real *reference* models on chosen mixtures and scores each one
next to the merged *proxy* of the same mixture. This module is the numeric core behind it, pure
numpy/scipy on one number per mixture and target:

- rank fidelity of proxy against real scores: Spearman, Kendall tau-b and Pearson with
  percentile bootstrap intervals, Spearman over the best quarter of references, the regret of
  the proxy's pick, and how much of the gain over a baseline that pick recovers; all of it per
  target and macro-averaged over domains in `fidelity_table`;
- calibrated proxies: the proxy-minus-real *gap* modelled as a function of the merge weights,
  fitted from the references (`fit_calibration`, `Calibration.apply`), with leave-one-out
  fidelity of raw against calibrated proxies (`loo_fidelity`);
- `relative_drift` of a component's parameters from the base.

Scores are losses (lower is better) unless `higher_is_better` says otherwise. The flag only
decides which end is "best" (top quarter, regret, gains, worst domain): correlations do not
depend on it, since proxy and real scores are the same kind of number.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations, zip_longest
from typing import Any

import numpy as np
import scipy.stats
from numpy.typing import ArrayLike

from merge_mix.errors import MergeMixError

MEAN_TARGET = "mean_loss"
WORST_TARGET = "worst_loss"
OBJECTIVE_TARGET = "objective"
"""A search objective's value as a validation target (lower is better: objectives are minimised)."""
N_BOOT = 2000
MIN_MIXTURES = 3
# Gap forms, simplest first. "linear" and "pairwise" have no intercept column: on the simplex
# sum_i w_i = 1, so a constant is already sum_i c * w_i (and pairwise is Scheffe's quadratic).
FORMS = (
    "constant",
    "constant+entropy",
    "linear",
    "linear+entropy",
    "pairwise",
    "pairwise+entropy",
)
# 0 keeps exact gaps exact; the others are there for noisy references with many features.
ALPHAS = (0.0, 1e-3, 1e-2, 1e-1, 1.0)
_CHUNK = 1 << 22  # elements per float64 chunk in relative_drift: bounds its extra memory


# --- rank fidelity ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Correlation:
    """A proxy-vs-real correlation with its percentile bootstrap interval.

    `value` is NaN, and `reason` says why, when the correlation is undefined (fewer than 3
    mixtures, constant scores). `n_boot` counts the resamples actually used: a resample in which
    either side is constant has no correlation and is skipped.
    """

    value: float
    low: float
    high: float
    n: int
    n_boot: int
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form; NaN becomes None."""
        return {
            "value": _json_float(self.value),
            "low": _json_float(self.low),
            "high": _json_float(self.high),
            "n": self.n,
            "n_boot": self.n_boot,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Regret:
    """What trusting the proxy costs: the real score of its favourite against the best one.

    `absolute` is real[pick] - real[best] for losses (real[best] - real[pick] when higher is
    better), so it is >= 0 and exactly 0 when the proxy's favourite is the best reference.
    `relative` divides it by |real[best]| (NaN if that is 0).
    """

    pick: int
    best: int
    absolute: float
    relative: float


def spearman(
    proxy: ArrayLike,
    real: ArrayLike,
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
    confidence: float = 0.95,
) -> Correlation:
    """Spearman rank correlation of proxy and real scores, with a bootstrap interval."""
    return _correlation("spearman", proxy, real, n_boot, seed, confidence)


def kendall(
    proxy: ArrayLike,
    real: ArrayLike,
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
    confidence: float = 0.95,
) -> Correlation:
    """Kendall tau-b (tie-corrected) of proxy and real scores, with a bootstrap interval."""
    return _correlation("kendall", proxy, real, n_boot, seed, confidence)


def pearson(
    proxy: ArrayLike,
    real: ArrayLike,
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
    confidence: float = 0.95,
) -> Correlation:
    """Pearson correlation of proxy and real scores, with a bootstrap interval."""
    return _correlation("pearson", proxy, real, n_boot, seed, confidence)


def top_indices(
    real: ArrayLike, *, fraction: float = 0.25, higher_is_better: bool = False
) -> np.ndarray:
    """Indices of the best ceil(fraction * n) mixtures by real score, best first.

    Ties keep their input order, so the selection is deterministic.
    """
    y = _scores(real, "real scores")
    if not 0 < fraction <= 1:
        raise MergeMixError(f"top fraction must be in (0, 1], got {fraction}")
    # The epsilon keeps e.g. 0.1 * 30 = 3.0000000000000004 from rounding up to 4.
    k = max(1, math.ceil(fraction * len(y) - 1e-9))
    return np.argsort(-y if higher_is_better else y, kind="stable")[:k]


def top_spearman(
    proxy: ArrayLike,
    real: ArrayLike,
    *,
    fraction: float = 0.25,
    min_points: int = 3,
    higher_is_better: bool = False,
    n_boot: int = N_BOOT,
    seed: int = 0,
    confidence: float = 0.95,
) -> Correlation:
    """Spearman over the best `fraction` of references by real score (DeMix's harder test).

    Telling good mixtures apart is harder than telling good from bad. NaN, with a reason, when
    the top set has fewer than `min_points` mixtures.
    """
    x, y = _paired(proxy, real)
    top = top_indices(y, fraction=fraction, higher_is_better=higher_is_better)
    if len(top) < min_points:
        reason = (
            f"the top {fraction:.0%} of {len(y)} references is {len(top)} mixtures;"
            f" needs at least {min_points}"
        )
        return Correlation(math.nan, math.nan, math.nan, len(top), 0, reason)
    return spearman(x[top], y[top], n_boot=n_boot, seed=seed, confidence=confidence)


def regret(proxy: ArrayLike, real: ArrayLike, *, higher_is_better: bool = False) -> Regret:
    """Regret of the proxy's pick (its best-scored mixture; first one on ties)."""
    x, y = _paired(proxy, real)
    pick, best = _best(x, higher_is_better), _best(y, higher_is_better)
    absolute = _worse_by(y[pick], y[best], higher_is_better)
    return Regret(pick, best, absolute, _ratio(absolute, abs(y[best])))


def capability_recovery(
    real: ArrayLike, pick: int, baseline: int, *, higher_is_better: bool = False
) -> float:
    """Fraction of the achievable gain over `baseline` that mixture `pick` recovers.

    For losses, (real[baseline] - real[pick]) / (real[baseline] - min(real)), where min(real) is
    the best reference: 1 when the pick is the best reference, 0 when it is no better than the
    baseline (usually the uniform mixture), negative when it is worse. NaN when the baseline is
    itself the best reference, since there is no gain to recover.
    """
    y = _scores(real, "real scores")
    pick, baseline = _index(pick, len(y), "pick"), _index(baseline, len(y), "baseline")
    best = _best(y, higher_is_better)
    gain = _worse_by(y[baseline], y[pick], higher_is_better)
    return _ratio(gain, _worse_by(y[baseline], y[best], higher_is_better))


def baseline_gain(
    real: ArrayLike, pick: int, baseline: int, *, higher_is_better: bool = False
) -> tuple[float, float]:
    """(absolute, relative) real improvement of `pick` over `baseline`; positive is better.

    Relative divides by |real[baseline]| (NaN if that is 0).
    """
    y = _scores(real, "real scores")
    pick, baseline = _index(pick, len(y), "pick"), _index(baseline, len(y), "baseline")
    gain = _worse_by(y[baseline], y[pick], higher_is_better)
    return gain, _ratio(gain, abs(y[baseline]))


def aggregate_targets(
    per_domain: Mapping[str, ArrayLike],
    *,
    higher_is_better: bool = False,
    mean_name: str = MEAN_TARGET,
    worst_name: str = WORST_TARGET,
) -> dict[str, np.ndarray]:
    """Per-mixture mean over domains and worst domain (max loss; min if higher is better)."""
    if not per_domain:
        raise MergeMixError("no per-domain scores to aggregate")
    arrays = [_scores(v, f"target {k!r}") for k, v in per_domain.items()]
    lengths = {len(a) for a in arrays}
    if len(lengths) > 1:
        raise MergeMixError(f"per-domain targets have different lengths {sorted(lengths)}")
    table = np.stack(arrays)
    worst = table.min(axis=0) if higher_is_better else table.max(axis=0)
    return {mean_name: table.mean(axis=0), worst_name: worst}


def fidelity_table(
    proxy: Mapping[str, ArrayLike],
    real: Mapping[str, ArrayLike],
    mixtures: Sequence[str],
    *,
    baselines: Mapping[str, int] | None = None,
    domain_targets: Sequence[str] | None = None,
    higher_is_better: bool | Mapping[str, bool] = False,
    n_boot: int = N_BOOT,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Every fidelity metric for every target, plus a macro average over per-domain targets.

    `proxy` and `real` map target name -> one score per mixture, in the order of `mixtures`
    (their labels). `baselines` maps a name ("uniform", "natural") to a mixture index; the
    top-level `capability_recovery` of a target is measured against "uniform" when given.
    `domain_targets` are the targets macro-averaged; by default every target except
    MEAN_TARGET, WORST_TARGET and OBJECTIVE_TARGET. All targets share one set of bootstrap resamples (same seed),
    and the macro Spearman interval resamples mixtures jointly across domains. The result is
    JSON-serialisable; undefined numbers are None.
    """
    targets = _check_targets(proxy, real, len(mixtures))
    labels = [str(m) for m in mixtures]
    if len(set(labels)) != len(labels):
        raise MergeMixError("mixture labels must be unique")
    if len(labels) < MIN_MIXTURES:
        raise MergeMixError(f"fidelity needs at least {MIN_MIXTURES} mixtures, got {len(labels)}")
    baselines = dict(baselines or {})
    for name, i in baselines.items():
        baselines[name] = _index(i, len(labels), f"baseline {name!r}")
    flags = _flags(higher_is_better, targets)
    if domain_targets is None:
        domain_targets = [
            t for t in targets if t not in (MEAN_TARGET, WORST_TARGET, OBJECTIVE_TARGET)
        ]
    for t in domain_targets:
        if t not in targets:
            raise MergeMixError(f"domain target {t!r} has no scores")
    boot = dict(n_boot=n_boot, seed=seed, confidence=confidence)

    out: dict[str, Any] = {}
    for t in targets:
        x, y, hib = targets[t][0], targets[t][1], flags[t]
        top = top_indices(y, higher_is_better=hib)
        r = regret(x, y, higher_is_better=hib)
        gains = {}
        for name, b in baselines.items():
            gain, relative = baseline_gain(y, r.pick, b, higher_is_better=hib)
            recovery = capability_recovery(y, r.pick, b, higher_is_better=hib)
            gains[name] = {
                "mixture": labels[b],
                "gain": _json_float(gain),
                "relative_gain": _json_float(relative),
                "recovery": _json_float(recovery),
            }
        out[t] = {
            "higher_is_better": hib,
            "spearman": spearman(x, y, **boot).as_dict(),
            "kendall": kendall(x, y, **boot).as_dict(),
            "pearson": pearson(x, y, **boot).as_dict(),
            "top_spearman": {
                **top_spearman(x, y, higher_is_better=hib, **boot).as_dict(),
                "mixtures": [labels[i] for i in top],
            },
            "regret": {
                "pick": labels[r.pick],
                "best": labels[r.best],
                "absolute": _json_float(r.absolute),
                "relative": _json_float(r.relative),
            },
            "capability_recovery": gains.get("uniform", {}).get("recovery"),
            "baselines": gains,
        }
    macro = None
    if domain_targets:
        pairs = [targets[t] for t in domain_targets]
        macro = {
            "targets": list(domain_targets),
            "spearman": _macro_spearman(pairs, domain_targets, **boot).as_dict(),
        }
        for key in ("kendall", "pearson", "top_spearman"):
            macro[key] = _json_float(_mean([out[t][key]["value"] for t in domain_targets]))
        macro["regret_relative"] = _json_float(
            _mean([out[t]["regret"]["relative"] for t in domain_targets])
        )
        macro["capability_recovery"] = _json_float(
            _mean([out[t]["capability_recovery"] for t in domain_targets])
        )
    return {
        "mixtures": labels,
        "n_mixtures": len(labels),
        "baselines": {name: labels[i] for name, i in baselines.items()},
        "n_boot": n_boot,
        "seed": seed,
        "confidence": confidence,
        "targets": out,
        "macro": macro,
    }


def _macro_spearman(
    pairs: list[tuple[np.ndarray, np.ndarray]],
    names: Sequence[str],
    *,
    n_boot: int,
    seed: int,
    confidence: float,
) -> Correlation:
    n = len(pairs[0][0])
    for (x, y), name in zip(pairs, names, strict=True):
        reason = _undefined_reason(x, y)
        if reason:
            return Correlation(math.nan, math.nan, math.nan, n, 0, f"{name}: {reason}")
    value = float(np.mean([_point("spearman", x, y) for x, y in pairs]))
    idx = _resamples(n, n_boot, seed)
    # A resample counts only if every domain has a Spearman in it: NaN propagates through mean.
    per_domain = np.stack([_boot_stats("spearman", x, y, idx) for x, y in pairs])
    low, high, used = _interval(per_domain.mean(axis=0), confidence)
    return Correlation(value, low, high, n, used)


def _correlation(
    kind: str, proxy: ArrayLike, real: ArrayLike, n_boot: int, seed: int, confidence: float
) -> Correlation:
    x, y = _paired(proxy, real)
    reason = _undefined_reason(x, y)
    if reason:
        return Correlation(math.nan, math.nan, math.nan, len(x), 0, reason)
    boot = _boot_stats(kind, x, y, _resamples(len(x), n_boot, seed))
    low, high, used = _interval(boot, confidence)
    return Correlation(_point(kind, x, y), low, high, len(x), used)


def _undefined_reason(x: np.ndarray, y: np.ndarray) -> str | None:
    if len(x) < MIN_MIXTURES:
        return f"needs at least {MIN_MIXTURES} mixtures, got {len(x)}"
    if np.ptp(x) == 0:
        return "proxy scores are all equal"
    if np.ptp(y) == 0:
        return "real scores are all equal"
    return None


def _point(kind: str, x: np.ndarray, y: np.ndarray) -> float:
    if kind == "spearman":
        return float(scipy.stats.spearmanr(x, y)[0])
    if kind == "kendall":
        return float(scipy.stats.kendalltau(x, y, variant="b")[0])
    return float(scipy.stats.pearsonr(x, y)[0])


def _resamples(n: int, n_boot: int, seed: int) -> np.ndarray:
    if n_boot < 1:
        raise MergeMixError(f"n_boot must be at least 1, got {n_boot}")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _boot_stats(kind: str, x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The statistic on every resample (rows of `idx`); NaN where either side is constant.

    Vectorised rather than one scipy call per resample (2000 x 3 calls per target is seconds),
    and equal to scipy's statistic on the resampled data (tests check it).
    """
    xs, ys = x[idx], y[idx]
    ok = (np.ptp(xs, axis=1) > 0) & (np.ptp(ys, axis=1) > 0)
    out = np.full(len(idx), math.nan)
    if ok.any():
        xs, ys = xs[ok], ys[ok]
        if kind == "spearman":
            xs, ys = scipy.stats.rankdata(xs, axis=1), scipy.stats.rankdata(ys, axis=1)
        out[ok] = _kendall_rows(xs, ys) if kind == "kendall" else _pearson_rows(xs, ys)
    return out


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    return (xc * yc).sum(axis=1) / np.sqrt((xc * xc).sum(axis=1) * (yc * yc).sum(axis=1))


def _kendall_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # tau-b = sum s_x s_y / sqrt(sum s_x^2 * sum s_y^2) over pairs, s = sign of the difference:
    # tied pairs have s = 0, which drops them from the numerator and from their side's count.
    out = np.empty(len(x))
    step = max(1, 2_000_000 // x.shape[1] ** 2)
    for s in range(0, len(x), step):
        dx = np.sign(x[s : s + step, :, None] - x[s : s + step, None, :])
        dy = np.sign(y[s : s + step, :, None] - y[s : s + step, None, :])
        num = (dx * dy).sum(axis=(1, 2))
        out[s : s + step] = num / np.sqrt((dx * dx).sum(axis=(1, 2)) * (dy * dy).sum(axis=(1, 2)))
    return out


def _interval(boot: np.ndarray, confidence: float) -> tuple[float, float, int]:
    if not 0 < confidence < 1:
        raise MergeMixError(f"confidence must be in (0, 1), got {confidence}")
    kept = boot[np.isfinite(boot)]
    if kept.size == 0:
        return math.nan, math.nan, 0
    tail = 50 * (1 - confidence)
    low, high = np.percentile(kept, [tail, 100 - tail])
    return float(low), float(high), int(kept.size)


# --- calibrated proxies ----------------------------------------------------------------------


@dataclass(frozen=True)
class GapFit:
    """The fitted proxy-minus-real gap of one target.

    `coefficients` maps feature name -> value: "intercept", "w[<domain>]",
    "w[<domain>]*w[<domain>]" and "H(w)" (entropy in nats), as the form has them. `loo_rmse`
    is the chosen form's leave-one-out RMSE; `candidates` has every form's (at its best
    alpha), None where there were too few references to try it.
    """

    form: str
    alpha: float
    coefficients: dict[str, float]
    loo_rmse: float
    candidates: dict[str, float | None]


@dataclass(frozen=True)
class Calibration:
    """Per-target models of the proxy-minus-real gap as a function of the merge weights.

    A calibrated proxy is proxy - gap(w). Build with `fit_calibration`; store with `to_dict`,
    load with `from_dict`.
    """

    domains: tuple[str, ...]
    n_references: int
    gaps: dict[str, GapFit]

    @property
    def target_names(self) -> list[str]:
        """The targets this calibration can correct."""
        return list(self.gaps)

    def predict_gap(self, merge_weights: ArrayLike, target: str) -> np.ndarray:
        """The modelled gap of `target` at each row of `merge_weights` (n, K)."""
        if target not in self.gaps:
            raise MergeMixError(f"calibration has no target {target!r}; it has {self.target_names}")
        w = _merge_weights(merge_weights, self.domains)
        fit = self.gaps[target]
        return _predict(fit.coefficients, fit.form, w, self.domains)

    def apply(
        self, merge_weights: ArrayLike, proxy_values: Mapping[str, float | ArrayLike]
    ) -> dict[str, float | np.ndarray]:
        """Calibrated proxies: proxy - predicted gap, for each target in `proxy_values`.

        `merge_weights` is one mixture (K,) with float values, or n mixtures (n, K) with arrays
        of n values.
        """
        single = np.ndim(merge_weights) == 1
        n = 1 if single else len(merge_weights)
        out: dict[str, float | np.ndarray] = {}
        for target, value in proxy_values.items():
            gap = self.predict_gap(merge_weights, target)
            v = np.asarray(value, dtype=np.float64)
            if v.shape != (() if single else (n,)):
                raise MergeMixError(
                    f"proxy value of {target!r} has shape {v.shape} for {n} mixture(s)"
                )
            out[target] = float(v - gap[0]) if single else v - gap
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form."""
        return {
            "domains": list(self.domains),
            "n_references": self.n_references,
            "targets": {
                t: {
                    "form": g.form,
                    "alpha": g.alpha,
                    "coefficients": dict(g.coefficients),
                    "loo_rmse": g.loo_rmse,
                    "candidates": dict(g.candidates),
                }
                for t, g in self.gaps.items()
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        """Inverse of `to_dict`; checks that each form's coefficients are all there."""
        try:
            domains = _domains(data["domains"])
            gaps = {}
            for t, g in data["targets"].items():
                form = _form(g["form"])
                names = ["intercept"] if form.split("+")[0] == "constant" else []
                names += _feature_names(form, domains)
                coefficients = {k: float(v) for k, v in g["coefficients"].items()}
                if sorted(coefficients) != sorted(names):
                    raise MergeMixError(
                        f"calibration target {t!r}: form {form!r} needs coefficients {names},"
                        f" got {sorted(coefficients)}"
                    )
                gaps[t] = GapFit(
                    form,
                    float(g["alpha"]),
                    coefficients,
                    float(g["loo_rmse"]),
                    {k: None if v is None else float(v) for k, v in g["candidates"].items()},
                )
            return cls(domains, int(data["n_references"]), gaps)
        except (KeyError, TypeError, AttributeError) as e:
            raise MergeMixError(f"calibration data is malformed: missing or bad {e}") from None


def mixture_entropy(merge_weights: ArrayLike) -> np.ndarray:
    """Shannon entropy in nats of each row of `merge_weights` (0 log 0 = 0)."""
    w = np.atleast_2d(np.asarray(merge_weights, dtype=np.float64))
    safe = np.where(w > 0, w, 1.0)
    return -(w * np.log(safe)).sum(axis=1)


def fit_calibration(
    merge_weights: ArrayLike,
    proxy: Mapping[str, ArrayLike],
    real: Mapping[str, ArrayLike],
    domains: Sequence[str],
    *,
    forms: Sequence[str] | None = None,
    alphas: Sequence[float] = ALPHAS,
) -> Calibration:
    """Fit the proxy-minus-real gap of every target from the references.

    `merge_weights` (n, K) has one simplex row per reference, columns in `domains` order.
    For each target, every form in `forms` (default: all of FORMS that the number of
    references allows) is fitted by ridge least squares at each alpha, and the (form, alpha)
    with the lowest leave-one-out RMSE wins; a richer form must beat a simpler one by more than
    rounding error, so an exact gap is recovered in its simplest form.
    """
    domains = _domains(domains)
    w = _merge_weights(merge_weights, domains)
    targets = _check_targets(proxy, real, len(w))
    forms = _forms(forms, len(w), len(domains))
    gaps = {t: _fit_gap(w, x - y, domains, forms, alphas) for t, (x, y) in targets.items()}
    return Calibration(domains, len(w), gaps)


def loo_fidelity(
    merge_weights: ArrayLike,
    proxy: Mapping[str, ArrayLike],
    real: Mapping[str, ArrayLike],
    domains: Sequence[str],
    *,
    forms: Sequence[str] | None = None,
    alphas: Sequence[float] = ALPHAS,
    n_boot: int = N_BOOT,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Leave-one-out fidelity of raw against calibrated proxies, per target.

    For each reference, the whole calibration (form and alpha selection included) is fitted on
    the others and applied to it, so the calibrated scores are honest out-of-sample proxies.
    Returns {target: {"raw": metrics, "calibrated": metrics, "loo_proxy": [calibrated proxy
    per mixture], "forms": [form chosen per left-out mixture]}}, with metrics = spearman,
    kendall, pearson (as in `Correlation.as_dict`) and rmse against the real scores.
    """
    domains = _domains(domains)
    w = _merge_weights(merge_weights, domains)
    targets = _check_targets(proxy, real, len(w))
    n = len(w)
    # Each fold fits on n - 1 references, so that is the count the forms must fit.
    forms = _forms(forms, n - 1, len(domains), extra=1)
    boot = dict(n_boot=n_boot, seed=seed, confidence=confidence)
    out: dict[str, Any] = {}
    for t, (x, y) in targets.items():
        calibrated, chosen = np.empty(n), []
        for i in range(n):
            keep = np.arange(n) != i
            fit = _fit_gap(w[keep], x[keep] - y[keep], domains, forms, alphas)
            calibrated[i] = x[i] - _predict(fit.coefficients, fit.form, w[i : i + 1], domains)[0]
            chosen.append(fit.form)
        out[t] = {
            "raw": _fidelity_summary(x, y, boot),
            "calibrated": _fidelity_summary(calibrated, y, boot),
            "loo_proxy": [float(v) for v in calibrated],
            "forms": chosen,
        }
    return out


def _fidelity_summary(x: np.ndarray, y: np.ndarray, boot: dict[str, Any]) -> dict[str, Any]:
    return {
        "spearman": spearman(x, y, **boot).as_dict(),
        "kendall": kendall(x, y, **boot).as_dict(),
        "pearson": pearson(x, y, **boot).as_dict(),
        "rmse": float(np.sqrt(np.mean((x - y) ** 2))),
    }


def _fit_gap(
    w: np.ndarray,
    gap: np.ndarray,
    domains: tuple[str, ...],
    forms: list[str],
    alphas: Sequence[float],
) -> GapFit:
    if not alphas or any(a < 0 for a in alphas):
        raise MergeMixError(f"ridge alphas must be a non-empty list of numbers >= 0, got {alphas}")
    n, k = w.shape
    candidates: dict[str, float | None] = {}
    best_alpha: dict[str, float] = {}
    for form in forms:
        if n < _needed(form, k):
            candidates[form] = None
            continue
        x = _features(form, w)
        scores = {}
        # Ties go to the larger alpha; with no features to penalise, alpha means nothing.
        for alpha in sorted(alphas, reverse=True) if x.shape[1] else [0.0]:
            scores.setdefault(_loo_rmse(x, gap, alpha), alpha)
        candidates[form] = min(scores)
        best_alpha[form] = scores[min(scores)]
    tried = [f for f in forms if candidates[f] is not None]
    lowest = min(candidates[f] for f in tried)
    form = next(f for f in tried if candidates[f] <= lowest * (1 + 1e-6) + 1e-12)
    intercept, beta = _ridge(_features(form, w), gap, best_alpha[form])
    names = _feature_names(form, domains)
    coefficients = dict(zip(names, beta.tolist(), strict=True))
    if form.split("+")[0] == "constant":
        coefficients = {"intercept": intercept, **coefficients}
    else:
        # On the simplex a constant c equals sum_i c * w_i: fold it in so the linear
        # coefficients are the gaps of the pure components, identifiable and comparable.
        for d in domains:
            coefficients[f"w[{d}]"] += intercept
    return GapFit(form, best_alpha[form], coefficients, candidates[form], candidates)


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[float, np.ndarray]:
    """Intercept and slopes of ridge least squares with an unpenalised intercept."""
    x_mean, y_mean = x.mean(axis=0), float(y.mean())
    if x.shape[1] == 0:
        return y_mean, np.zeros(0)
    xc, yc = x - x_mean, y - y_mean
    if alpha > 0:
        xc = np.vstack([xc, math.sqrt(alpha) * np.eye(x.shape[1])])
        yc = np.concatenate([yc, np.zeros(x.shape[1])])
    # Minimum-norm solution: centred simplex columns are collinear (they sum to 0), and the
    # prediction is the same whichever solution lstsq would pick.
    beta = np.linalg.lstsq(xc, yc, rcond=None)[0]
    return y_mean - float(x_mean @ beta), beta


def _loo_rmse(x: np.ndarray, y: np.ndarray, alpha: float) -> float:
    errors = np.empty(len(y))
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        intercept, beta = _ridge(x[keep], y[keep], alpha)
        errors[i] = intercept + x[i] @ beta - y[i]
    return float(np.sqrt(np.mean(errors**2)))


def _features(form: str, w: np.ndarray) -> np.ndarray:
    base, _, extra = form.partition("+")
    cols = []
    if base in ("linear", "pairwise"):
        cols += [w[:, i] for i in range(w.shape[1])]
    if base == "pairwise":
        cols += [w[:, i] * w[:, j] for i, j in combinations(range(w.shape[1]), 2)]
    if extra == "entropy":
        cols.append(mixture_entropy(w))
    return np.column_stack(cols) if cols else np.empty((len(w), 0))


def _feature_names(form: str, domains: Sequence[str]) -> list[str]:
    base, _, extra = form.partition("+")
    names = []
    if base in ("linear", "pairwise"):
        names += [f"w[{d}]" for d in domains]
    if base == "pairwise":
        names += [f"w[{a}]*w[{b}]" for a, b in combinations(domains, 2)]
    if extra == "entropy":
        names.append("H(w)")
    return names


def _predict(
    coefficients: Mapping[str, float], form: str, w: np.ndarray, domains: Sequence[str]
) -> np.ndarray:
    beta = np.array([coefficients[n] for n in _feature_names(form, domains)])
    return coefficients.get("intercept", 0.0) + _features(form, w) @ beta


def _needed(form: str, k: int) -> int:
    """References needed to try a form: its free parameters on the simplex, plus 2.

    Plus 2 so that each leave-one-out fit has at least one residual degree of freedom.
    """
    base, _, extra = form.partition("+")
    params = {"constant": 1, "linear": k, "pairwise": k * (k + 1) // 2}[base]
    return params + (extra == "entropy") + 2


def _forms(forms: Sequence[str] | None, n: int, k: int, extra: int = 0) -> list[str]:
    """The forms to try, simplest first. Explicit ones must all fit `n` references; by default
    the ones that do not are skipped (recorded as None), but at least one must fit."""
    chosen = list(FORMS) if forms is None else [_form(f) for f in forms]
    if not chosen:
        raise MergeMixError("no calibration forms given")
    chosen = sorted(set(chosen), key=lambda f: (_needed(f, k), FORMS.index(f)))
    for f in chosen:
        if n < _needed(f, k) and (forms is not None or f == chosen[0]):
            raise MergeMixError(
                f"calibration form {f!r} needs at least {_needed(f, k) + extra} references"
                f" with {k} domains, got {n + extra}"
            )
    return chosen


def _form(form: str) -> str:
    if form not in FORMS:
        raise MergeMixError(f"unknown calibration form {form!r}; choose from {list(FORMS)}")
    return form


def _domains(domains: Sequence[str]) -> tuple[str, ...]:
    names = tuple(str(d) for d in domains)
    if len(names) < 2 or len(set(names)) != len(names):
        raise MergeMixError(f"calibration needs at least 2 distinct domain names, got {names}")
    return names


def _merge_weights(merge_weights: ArrayLike, domains: Sequence[str]) -> np.ndarray:
    w = np.atleast_2d(np.asarray(merge_weights, dtype=np.float64))
    if w.ndim != 2 or w.shape[1] != len(domains):
        raise MergeMixError(
            f"merge weights have shape {np.shape(merge_weights)}; expected (n, {len(domains)})"
            f" for domains {list(domains)}"
        )
    for i, row in enumerate(w):
        if not np.all(np.isfinite(row)) or row.min() < -1e-9 or abs(row.sum() - 1) > 1e-6:
            raise MergeMixError(
                f"merge weights of mixture {i} are {row.tolist()}; each row must be finite,"
                " non-negative and sum to 1"
            )
    # Exactly on the simplex, so folding the intercept into the linear terms is exact.
    w = np.clip(w, 0.0, None)
    return w / w.sum(axis=1, keepdims=True)


# --- drift -----------------------------------------------------------------------------------


def relative_drift(base_tensors: Iterable[Any], comp_tensors: Iterable[Any]) -> float:
    """||theta_component - theta_base|| / ||theta_base|| over all parameters together.

    Takes two iterables of numpy arrays or torch tensors in matching order, or two mappings
    name -> tensor matched by name. Streams tensor by tensor (in chunks), accumulating sums of
    squares in float64, so it never holds more than a chunk of extra memory.
    """
    if isinstance(base_tensors, Mapping) and isinstance(comp_tensors, Mapping):
        only = sorted(set(base_tensors) ^ set(comp_tensors))
        if only:
            raise MergeMixError(f"tensor {only[0]!r} is in only one of base and component")
        pairs: Iterable[tuple[str, Any, Any]] = (
            (name, base_tensors[name], comp_tensors[name]) for name in base_tensors
        )
    else:
        pairs = (
            (f"#{i}", b, c)
            for i, (b, c) in enumerate(zip_longest(base_tensors, comp_tensors, fillvalue=None))
        )
    diff_sq = base_sq = 0.0
    for name, b, c in pairs:
        if b is None or c is None:
            raise MergeMixError("base and component have different numbers of tensors")
        b, c = _tensor(b), _tensor(c)
        if tuple(b.shape) != tuple(c.shape):
            raise MergeMixError(
                f"tensor {name}: base shape {tuple(b.shape)} but component shape {tuple(c.shape)}"
            )
        b, c = b.reshape(-1), c.reshape(-1)
        for s in range(0, b.shape[0], _CHUNK):
            bb, cc = _float64(b[s : s + _CHUNK]), _float64(c[s : s + _CHUNK])
            diff_sq += float(np.square(cc - bb).sum())
            base_sq += float(np.square(bb).sum())
    if not math.isfinite(diff_sq) or not math.isfinite(base_sq):
        raise MergeMixError("parameters contain NaN or infinity; relative drift is undefined")
    if base_sq == 0:
        raise MergeMixError("base parameters are all zero; relative drift is undefined")
    return math.sqrt(diff_sq / base_sq)


def _tensor(t: Any) -> Any:
    # Torch tensors stay torch until chunked, so a bf16 GPU tensor is never copied whole.
    return t if hasattr(t, "detach") else np.asarray(t)


def _float64(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):
        import torch  # only when torch tensors are passed: keeps numpy callers light

        return t.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(t, dtype=np.float64)


# --- small helpers ---------------------------------------------------------------------------


def _scores(values: ArrayLike, what: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise MergeMixError(f"{what}: expected one score per mixture, got shape {x.shape}")
    bad = np.flatnonzero(~np.isfinite(x))
    if bad.size:
        raise MergeMixError(f"{what}: mixture {bad[0]} has score {x[bad[0]]}; all must be finite")
    return x


def _paired(proxy: ArrayLike, real: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    x, y = _scores(proxy, "proxy scores"), _scores(real, "real scores")
    if len(x) != len(y):
        raise MergeMixError(f"{len(x)} proxy scores but {len(y)} real scores")
    return x, y


def _check_targets(
    proxy: Mapping[str, ArrayLike], real: Mapping[str, ArrayLike], n: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if not proxy:
        raise MergeMixError("no targets given")
    only = sorted(set(proxy) ^ set(real))
    if only:
        side = "proxy" if only[0] in proxy else "real"
        raise MergeMixError(f"target {only[0]!r} has {side} scores but no counterpart")
    out = {}
    for t in proxy:
        x = _scores(proxy[t], f"proxy {t!r}")
        y = _scores(real[t], f"real {t!r}")
        if len(x) != n or len(y) != n:
            raise MergeMixError(
                f"target {t!r}: {len(x)} proxy and {len(y)} real scores for {n} mixtures"
            )
        out[t] = (x, y)
    return out


def _flags(higher_is_better: bool | Mapping[str, bool], targets: Iterable[str]) -> dict[str, bool]:
    if isinstance(higher_is_better, bool):
        return {t: higher_is_better for t in targets}
    targets = list(targets)
    unknown = sorted(set(higher_is_better) - set(targets))
    if unknown:
        raise MergeMixError(f"higher_is_better names unknown target {unknown[0]!r}")
    return {t: bool(higher_is_better.get(t, False)) for t in targets}


def _index(i: int, n: int, what: str) -> int:
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < n:
        raise MergeMixError(f"{what} index {i!r} is not a mixture index in [0, {n})")
    return int(i)


def _best(values: np.ndarray, higher_is_better: bool) -> int:
    return int(np.argmax(values) if higher_is_better else np.argmin(values))


def _worse_by(a: float, b: float, higher_is_better: bool) -> float:
    """How much worse score a is than score b (negative if better)."""
    return float(b - a if higher_is_better else a - b)


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else math.nan


def _mean(values: Sequence[float | None]) -> float:
    return math.nan if any(v is None for v in values) else float(np.mean(values))


def _json_float(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)
