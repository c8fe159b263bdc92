"""Paired comparisons of two models on the same held-out documents, with intervals.

Every comparison merge-mix reports (a pick against the uniform or natural mixture, one pick
against another, a proxy against a real model) is a difference of one quantity (an
objective, or a per-domain loss) computed for two models on the *same* documents. Its
uncertainty is estimated by a paired bootstrap over documents: each resample draws every
domain's documents with replacement (stratified by domain, whole documents, since the
pieces of one document are correlated) and recomputes the quantity for both models on the
resample, so document-level noise common to both cancels. The interval is the percentile
interval of the resampled differences.

A verdict reads the interval, lower is better (a loss):

- ``better``: the whole interval is below zero,
- ``worse``: the whole interval is above zero,
- ``not distinguishable``: it contains zero.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import asdict, dataclass

import numpy as np

from merge_mix.evaluate import DocumentScores, metrics_from_documents

N_BOOT = 2000
CONFIDENCE = 0.95
VERDICTS = ("better", "not distinguishable", "worse")


@dataclass(frozen=True)
class Comparison:
    """`delta` = value(a) - value(b) on all documents, its bootstrap interval, a verdict."""

    delta: float
    lo: float
    hi: float
    verdict: str
    """"better" (a lower than b), "worse" or "not distinguishable" (lower is better)."""
    confidence: float
    n_boot: int
    documents: dict[str, int]
    """Documents per domain the comparison was measured on."""

    def to_dict(self) -> dict:
        return asdict(self)


def verdict_of(lo: float, hi: float) -> str:
    if hi < 0:
        return "better"
    if lo > 0:
        return "worse"
    return "not distinguishable"


def resample_counts(documents: Mapping[str, int], n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """Per domain, a (n_boot, n_documents) matrix of how often each document is drawn."""
    rng = np.random.default_rng(seed)
    return {
        d: rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
        for d, n in documents.items()
    }


def _check_same_documents(scores: Mapping[str, Mapping[str, DocumentScores]]) -> None:
    first_name, first = next(iter(scores.items()))
    for name, side in scores.items():
        if set(side) != set(first):
            raise ValueError(f"compare: {name} and {first_name} cover different domains")
        for d in first:
            if not np.array_equal(side[d].tokens, first[d].tokens):
                raise ValueError(f"compare: domain {d!r} was scored on different documents")


def compare_models(
    scores: Mapping[str, Mapping[str, DocumentScores]],
    values: Callable[[dict[str, dict[str, float]]], Mapping[Hashable, float]],
    pairs: list[tuple[Hashable, Hashable]],
    n_boot: int = N_BOOT,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> dict[tuple[Hashable, Hashable], Comparison]:
    """Compare several models scored on the same documents, in one bootstrap.

    `scores` maps a model's name to its per-domain document scores; `values` maps every
    model's held-out metrics (``heldout/<d>/loss`` ...) to its value (one call per
    resample, so a value may depend on another model's metrics on the same resample, as a
    constraint relative to a baseline does) and may return values under other keys too
    (say, one model's loss on one domain); `pairs` lists the (a, b) differences
    value(a) - value(b) to report, by those keys."""
    _check_same_documents(scores)
    documents = {d: len(s.nll) for d, s in next(iter(scores.values())).items()}
    point = values({name: metrics_from_documents(side) for name, side in scores.items()})
    counts = resample_counts(documents, n_boot, seed)
    diffs = np.empty((len(pairs), n_boot))
    for i in range(n_boot):
        row = {d: c[i] for d, c in counts.items()}
        v = values({name: metrics_from_documents(side, row) for name, side in scores.items()})
        for j, (a, b) in enumerate(pairs):
            diffs[j, i] = v[a] - v[b]
    tail = (1 - confidence) / 2
    out = {}
    for j, (a, b) in enumerate(pairs):
        lo, hi = (float(x) for x in np.quantile(diffs[j], [tail, 1 - tail]))
        out[(a, b)] = Comparison(
            delta=float(point[a] - point[b]),
            lo=lo,
            hi=hi,
            verdict=verdict_of(lo, hi),
            confidence=confidence,
            n_boot=n_boot,
            documents=documents,
        )
    return out


def paired_bootstrap(
    a: Mapping[str, DocumentScores],
    b: Mapping[str, DocumentScores],
    value: Callable[[dict[str, float]], float],
    n_boot: int = N_BOOT,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Comparison:
    """Compare two models scored on the same documents by `value(metrics)`, a function of
    one model's held-out metrics (``heldout/<d>/loss`` ...)."""
    result = compare_models(
        {"a": a, "b": b},
        lambda m: {k: value(v) for k, v in m.items()},
        [("a", "b")],
        n_boot,
        confidence,
        seed,
    )
    return result[("a", "b")]


def domain_loss(domain: str) -> Callable[[dict[str, float]], float]:
    """The loss of a domain (or of a target set, keyed ``target/<name>``) in a metrics dict."""
    key = f"{domain}/loss" if domain.startswith("target/") else f"heldout/{domain}/loss"
    return lambda m: m[key]


def unit_of(objective) -> str:
    """The unit of an objective's value: nats/token or bits/byte when every term is a
    held-out loss or bits-per-byte, else "objective units"."""
    metrics = {(t.source, t.metric) for t in objective.terms}
    if metrics <= {("heldout", "loss"), ("calibrated", "loss"), ("target", "loss")}:
        return "nats/token"
    if metrics <= {("heldout", "bpb"), ("target", "bpb")}:
        return "bits/byte"
    return "objective units"


def sentence(c: Mapping, other: str, unit: str, split: str = "test") -> str:
    """The verdict as the CLI, the report and best.json say it, e.g. "better than uniform
    by 0.0123 [0.0050, 0.0190] nats/token on the test split" (a gain is a positive number:
    how much lower the pick's value is; "gain" in the not-distinguishable case too)."""
    gain, lo, hi = -c["delta"], -c["hi"], -c["lo"]
    interval = f"{gain:.4f} [{lo:.4f}, {hi:.4f}] {unit}"
    if c["verdict"] == "better":
        return f"better than {other} by {interval} on the {split} split"
    if c["verdict"] == "worse":
        return (
            f"worse than {other} by {-gain:.4f} [{-hi:.4f}, {-lo:.4f}] {unit} on the {split} split"
        )
    return f"not distinguishable from {other} on the {split} split (gain {interval})"
