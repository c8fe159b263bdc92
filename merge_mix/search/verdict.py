"""The verdict on a search: its picks judged on the test split, with paired intervals.

A search selects its best mixture on the pool's ``search`` split; a number measured on the
data it was selected on is biased in its favour. The verdict re-scores the pick, the
baselines (uniform, natural) and the other methods' picks (best sampled, surrogate,
gradient) on every document of the ``test`` split, which no part of the search reads, and
compares them in one paired bootstrap over documents (`merge_mix.compare`): the objective
of the pick against each baseline and each other pick, and every domain's loss against the
uniform mixture. Written to ``verdict.json`` in the run directory and merged into
``best.json`` (key ``test``) when it concerns the current best trial.

lm-eval terms of an objective are not re-scored per document: their values from the
search are held fixed in both sides of a comparison, so the interval covers the held-out
terms only (the verdict says so).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from merge_mix.artifacts import write_json_atomic
from merge_mix.compare import CONFIDENCE, N_BOOT, compare_models, domain_loss, sentence, unit_of
from merge_mix.evaluate import metrics_from_documents
from merge_mix.objective import Objective

VERDICT = "verdict.json"
# Which trials count as another method's pick: the best full-budget row of each family.
PICK_FAMILIES = {
    "best sampled": ("sampler:", "halving:", "grid:"),
    "surrogate": ("surrogate:",),
    "gradient": ("gradient:",),
}


def other_picks(rows: Sequence[Mapping[str, Any]], best_number: int) -> dict[str, Mapping]:
    """The best full-budget feasible row of each method family, unless it is the best."""
    out = {}
    for name, prefixes in PICK_FAMILIES.items():
        family = [
            r
            for r in rows
            if r["kind"].startswith(prefixes)
            and r["full_budget"]
            and r["feasible"]
            and r["objective"] is not None
        ]
        if family:
            row = min(family, key=lambda r: (r["objective"], r["number"]))
            if row["number"] != best_number:
                out[f"{name} (#{row['number']})"] = row
    return out


def judge(
    scorer,
    objective: Objective,
    run_dir: Path,
    n_boot: int = N_BOOT,
    confidence: float = CONFIDENCE,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Score the run's best trial, the baselines and the other picks on the test split and
    write ``verdict.json``; returns its content. Reuses a verdict.json made for the same
    trials and settings."""
    run_dir = Path(run_dir)
    rows = [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]
    best = json.loads((run_dir / "best.json").read_text())
    domains = list(scorer.domains)
    k = len(domains)
    # Per-set verdicts cover the target sets too (keyed target/<name>), after the domains.
    judged = domains + [f"target/{t}" for t in getattr(scorer, "targets", ())]
    weights: dict[str, np.ndarray] = {
        "pick": np.asarray([best["merge_weights"][d] for d in domains]),
        "uniform": np.full(k, 1.0 / k),
        "natural": np.asarray(scorer.natural_mixture, dtype=float),
    }
    fixed: dict[str, dict[str, float]] = {"pick": _fixed(best["metrics"])}
    for name in ("uniform", "natural"):
        row = next((r for r in rows if r["kind"] == f"baseline:{name}" and r["full_budget"]), None)
        fixed[name] = _fixed(row["metrics"]) if row else {}
    numbers = {"pick": best["number"]}
    for name, row in other_picks(rows, best["number"]).items():
        weights[name] = np.asarray([row["merge_weights"][d] for d in domains])
        fixed[name] = _fixed(row["metrics"])
        numbers[name] = row["number"]
    settings = {
        "numbers": numbers,
        "n_boot": n_boot,
        "confidence": confidence,
        "seed": seed,
        "weights": {n: w.round(12).tolist() for n, w in weights.items()},
    }
    path = run_dir / VERDICT
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous.get("settings") == settings:
            return previous

    from tqdm import tqdm

    started = time.perf_counter()
    scores = {}
    for name, w in tqdm(
        weights.items(), desc="test split", disable=not progress, dynamic_ncols=True
    ):
        scores[name] = scorer.document_scores(w, "test")

    scored_s = time.perf_counter() - started
    calibration = getattr(scorer, "calibration", None)

    def full_metrics(name: str, heldout: dict[str, float]) -> dict[str, float]:
        m = {**heldout, **fixed[name]}
        if calibration is not None:
            m.update(calibration.apply(weights[name], m))
        return m

    def values(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
        full = {name: full_metrics(name, m) for name, m in metrics.items()}
        base = full[objective.baseline] if objective.constraints else None
        out = {name: objective.evaluate(m, base).value for name, m in full.items()}
        # Per-domain losses of the pick and uniform, judged on the same resamples.
        for name in ("pick", "uniform"):
            out.update({(name, d): domain_loss(d)(metrics[name]) for d in judged})
        return out

    others = [n for n in weights if n != "pick"]
    pairs = [("pick", n) for n in others] + [(n, "uniform") for n in others if n != "uniform"]
    domain_pairs = [(("pick", d), ("uniform", d)) for d in judged]
    comparisons = compare_models(scores, values, pairs + domain_pairs, n_boot, confidence, seed)
    unit = unit_of(objective)
    point = values({n: metrics_from_documents(s) for n, s in scores.items()})
    per_domain = {
        d: {
            "pick": float(point[("pick", d)]),
            "uniform": float(point[("uniform", d)]),
            **_entry(comparisons.pop(pair).to_dict(), "uniform", "nats/token"),
        }
        for d, pair in zip(judged, domain_pairs, strict=True)
    }
    vs = {}
    for (a, b), c in comparisons.items():
        key = b if a == "pick" else f"{a} vs {b}"
        vs[key] = _entry(c.to_dict(), b, unit)
    headline = vs["uniform"]
    verdict = {
        "split": "test",
        "unit": unit,
        "trial": best["number"],
        "verdict": headline["verdict"],
        "sentence": headline["sentence"],
        "objective": {n: float(point[n]) for n in weights},
        "comparisons": vs,
        "per_domain_loss": per_domain,
        "documents": {d: int(len(s.nll)) for d, s in scores["pick"].items()},
        "tokens": {d: int(s.tokens.sum()) for d, s in scores["pick"].items()},
        "fixed_terms": sorted({k for f in fixed.values() for k in f}),
        # A calibration is fitted on the search split (validate); here it is applied to
        # test-split losses, i.e. the proxy-to-real gap is assumed to carry over.
        "calibration_fitted_on": getattr(calibration, "split", None),
        "settings": settings,
        "cost_s": {
            "scoring": round(scored_s, 3),
            "bootstrap": round(time.perf_counter() - started - scored_s, 3),
        },
    }
    write_json_atomic(path, verdict)
    return verdict


def _entry(c: dict[str, Any], other: str, unit: str) -> dict[str, Any]:
    return {**c, "unit": unit, "sentence": sentence(c, other, unit)}


def _fixed(metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics a test-split re-score does not reproduce (benchmarks)."""
    return {k: v for k, v in metrics.items() if k.startswith("lmeval/")}
