"""Calibrated proxies: the proxy-minus-real gap modelled from the references.

`fit_calibration` models each target's proxy-minus-real *gap* as a function of the merge
weights (a form from FORMS, ridge least squares at an alpha from ALPHAS, both chosen by
leave-one-out RMSE) and returns a `Calibration`, whose `apply` gives calibrated proxies
(``proxy - gap(w)``); `loo_fidelity` measures the leave-one-out fidelity of raw against
calibrated proxies. `mixture_entropy` is the entropy feature of the "+entropy" forms.

A pool's stored fit (calibration.json) and the `ProxyCalibration` the scorer applies are in
`merge_mix.validate.proxy_calibration`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from merge_mix.errors import MergeMixError
from merge_mix.validate.metrics import (
    N_BOOT,
    check_targets,
    kendall,
    pearson,
    spearman,
)

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
    targets = check_targets(proxy, real, len(w))
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
    proxy_eval: Mapping[str, ArrayLike] | None = None,
    real_eval: Mapping[str, ArrayLike] | None = None,
) -> dict[str, Any]:
    """Leave-one-out fidelity of raw against calibrated proxies, per target.

    For each reference, the whole calibration (form and alpha selection included) is fitted on
    the others and applied to it, so the calibrated scores are honest out-of-sample proxies.
    The gaps are fitted on `proxy` and `real`; with `proxy_eval` and `real_eval` (the same
    targets measured on other documents: validate fits on the search split and judges on the
    test split) the left-out proxy and the fidelity come from those, else from the fitting
    scores. Returns {target: {"raw": metrics, "calibrated": metrics, "loo_proxy": [calibrated
    proxy per mixture], "forms": [form chosen per left-out mixture]}}, with metrics =
    spearman, kendall, pearson (as in `Correlation.as_dict`) and rmse against the real scores.
    """
    domains = _domains(domains)
    w = _merge_weights(merge_weights, domains)
    targets = check_targets(proxy, real, len(w))
    if (proxy_eval is None) != (real_eval is None):
        raise MergeMixError("loo_fidelity: give both proxy_eval and real_eval, or neither")
    judged = targets if proxy_eval is None else check_targets(proxy_eval, real_eval, len(w))
    if set(judged) != set(targets):
        raise MergeMixError("loo_fidelity: the evaluation scores name other targets")
    n = len(w)
    # Each fold fits on n - 1 references, so that is the count the forms must fit.
    forms = _forms(forms, n - 1, len(domains), extra=1)
    boot = dict(n_boot=n_boot, seed=seed, confidence=confidence)
    out: dict[str, Any] = {}
    for t, (x, y) in targets.items():
        xe, ye = judged[t]
        calibrated, chosen = np.empty(n), []
        for i in range(n):
            keep = np.arange(n) != i
            fit = _fit_gap(w[keep], x[keep] - y[keep], domains, forms, alphas)
            calibrated[i] = xe[i] - _predict(fit.coefficients, fit.form, w[i : i + 1], domains)[0]
            chosen.append(fit.form)
        out[t] = {
            "raw": _fidelity_summary(xe, ye, boot),
            "calibrated": _fidelity_summary(calibrated, ye, boot),
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
