"""Rank fidelity of merged proxies against real references: correlations, regret, gains.

The `validate` stage trains a few real *reference* models on chosen mixtures and scores each one
next to the merged *proxy* of the same mixture. This module measures, in pure numpy/scipy on one
number per mixture and target, how faithfully the proxies rank the mixtures: Spearman, Kendall
tau-b and Pearson with percentile bootstrap intervals, Spearman over the best quarter of
references, the regret of the proxy's pick, and how much of the gain over a baseline that pick
recovers; all of it per target and macro-averaged over domains in `fidelity_table`. Targets are
per-domain scores, their mean and worst domain (`aggregate_targets`: MEAN_TARGET, WORST_TARGET)
and a search objective's value (OBJECTIVE_TARGET); `fidelity_holds` is the verdict on whether
raw proxies rank faithfully enough to trust.

Calibrated proxies are in `merge_mix.validate.calibration`, parameter drift in
`merge_mix.validate.drift`.

Scores are losses (lower is better) unless `higher_is_better` says otherwise. The flag only
decides which end is "best" (top quarter, regret, gains, worst domain): correlations do not
depend on it, since proxy and real scores are the same kind of number.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
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
FIDELITY_HOLDS = 0.8
"""Raw Spearman, on the mean loss over domains and macro over domains, at or above which
validation calls proxy fidelity "holding" (DeMix reports a macro 0.81)."""


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
    targets = check_targets(proxy, real, len(mixtures))
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


# --- verdict ---------------------------------------------------------------------------------


def fidelity_holds(macro_spearman: float | None, mean_spearman: float | None) -> bool:
    """Whether raw proxies rank faithfully enough to trust (see FIDELITY_HOLDS)."""
    return all(v is not None and v >= FIDELITY_HOLDS for v in (macro_spearman, mean_spearman))


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


def check_targets(
    proxy: Mapping[str, ArrayLike], real: Mapping[str, ArrayLike], n: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{target: (proxy, real)} as float arrays, after checking that both sides name the same
    targets and give each `n` finite scores (also used by `merge_mix.validate.calibration`)."""
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
