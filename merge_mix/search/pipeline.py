"""`merge-mix search` end to end: a pool's proxy scorer -> sampling search -> gradient
search -> verdict on the test split -> report, all in one run directory.

The sampling part is `run_search` (resumable, shareable study); the gradient search runs
after it in the same worker, is recorded in the same study (kind ``gradient:<method>``),
and is compared with sampling at equal wall time in ``gradient.json``. Everything up to
here reads the pool's ``search`` split only; the verdict (`merge_mix.search.verdict`)
then judges the picks on the ``test`` split with paired bootstrap intervals.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from merge_mix.artifacts import write_json_atomic
from merge_mix.objective import Objective
from merge_mix.search.config import SearchConfig
from merge_mix.search.gradient import GradientConfig, gradient_search

# Below this many test documents in a domain, the document bootstrap says little.
MIN_TEST_DOCUMENTS = 10


def sampling_at_equal_time(rows: list[dict], seconds: float) -> dict[str, Any] | None:
    """Best full-budget sampler trial found within `seconds` of cumulative scoring time,
    counting baselines first (they are scored first in every study)."""
    spent, best = 0.0, None
    for row in rows:
        kind = row["kind"]
        if not (kind.startswith("baseline:") or kind.startswith("sampler:")):
            continue
        if not row.get("full_budget", True) or row["objective"] is None:
            continue
        spent += float(row.get("cost_s") or 0.0)
        if spent > seconds:
            break
        if best is None or row["objective"] < best["objective"]:
            best = {"number": row["number"], "kind": kind, "objective": row["objective"]}
    if best is not None:
        best["seconds"] = round(min(spent, seconds), 3)
    return best


def _on_training_slice(scorer, objective, result, domains, best_sampled) -> dict[str, float]:
    """The objective of the gradient's pick, the best sampled mixture and the uniform one on
    the gradient's training slice (the first pieces of the search split) — what the
    gradient optimised; the verdict on the test split says what holds up."""
    from merge_mix.evaluate import heldout_metrics

    def metrics_of(weights):
        model = scorer.merger.merge(np.asarray(weights, dtype=np.float64))
        return heldout_metrics(
            model, result.training_slice, scorer.device, scorer.precision, scorer.batch_size
        )

    k = len(domains)
    uniform = metrics_of(np.full(k, 1.0 / k))
    baseline = uniform if objective.constraints else None

    def value(weights):
        return objective.evaluate(metrics_of(weights), baseline).value

    out = {
        "uniform": objective.evaluate(uniform, baseline).value,
        "gradient": value(result.weights),
    }
    if best_sampled is not None:
        w = [best_sampled["merge_weights"][d] for d in domains]
        out[f"best_sampled (#{best_sampled['number']})"] = value(w)
    return out


def run_gradient(
    scorer,
    objective: Objective,
    config: SearchConfig,
    gradient: GradientConfig,
    run_dir: Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Gradient search from the uniform mixture; record it in the study and compare it with
    sampling at equal wall time. Returns the summary written to ``gradient.json``."""
    from tqdm import tqdm

    from merge_mix.search.study import export_trials, open_study, record_trial

    study = open_study(run_dir, list(scorer.domains), objective, config.storage, config.study_name)
    with tqdm(
        total=gradient.steps,
        desc=f"gradient [{gradient.method}]",
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:

        def tick(step, value, weights):
            bar.set_postfix(train_objective=f"{value:.4f}")
            bar.update(1)

        caps = config.caps_for(scorer).weights
        result = gradient_search(scorer, objective, gradient, progress=tick, caps=caps)
    started = time.perf_counter()
    metrics = scorer.score(result.weights, config.budget_tokens)
    score_s = time.perf_counter() - started
    value = record_trial(
        study, objective, result.weights, metrics, kind=f"gradient:{gradient.method}",
        worker=config.worker, effective_mixture=scorer.effective_mixture(result.weights),
        budget_tokens=config.budget_tokens, full_budget=True,
        cost_s=result.wall_time_s + score_s,
    )  # fmt: skip
    export_trials(study, run_dir)
    rows = [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]
    seconds = result.wall_time_s + score_s
    sampled = [
        r
        for r in rows
        if r["kind"].startswith(("sampler:", "baseline:"))
        and r["objective"] is not None
        and r.get("full_budget", True)
    ]
    best_sampled = min(sampled, key=lambda r: r["objective"], default=None)
    summary = {
        "config": asdict(gradient),
        "merge_weights": dict(zip(scorer.domains, map(float, result.weights), strict=True)),
        "objective": value,
        "evaluations": result.evaluations + 1,
        "wall_time_s": round(seconds, 3),
        "sampling_at_equal_time": sampling_at_equal_time(rows, seconds),
        "best_sampled": None if best_sampled is None else best_sampled["objective"],
        "on_training_slice": _on_training_slice(
            scorer, objective, result, scorer.domains, best_sampled
        ),
        "history": result.history,
    }
    write_json_atomic(run_dir / "gradient.json", summary)
    return summary


def search_pool(
    pool_dir: Path,
    objective: Objective,
    config: SearchConfig,
    run_dir: Path,
    gradient: GradientConfig | None = None,
    scorer_options: dict[str, Any] | None = None,
    judge_test: bool = True,
) -> dict[str, Any]:
    """Search `pool_dir` for the mixture that minimises `objective` on the search split,
    judge the picks on the test split, write the report. `gradient` None skips the
    gradient search; `judge_test` False skips the verdict (a worker that only adds trials).

    Returns a summary: the best trial, the verdict, the gradient comparison, the report
    paths."""
    from merge_mix.proxy import ProxyScorer
    from merge_mix.report import write_report
    from merge_mix.search.run import run_search

    options = dict(scorer_options or {})
    if objective.needs_lmeval and not options.get("lmeval_tasks"):
        from merge_mix.errors import MergeMixError

        raise MergeMixError("objective: it uses lm-eval metrics; name the tasks with --tasks")
    uses_calibrated = any(
        item.source == "calibrated" for item in (*objective.terms, *objective.constraints)
    )
    if uses_calibrated and options.get("calibration") is None:
        from merge_mix.errors import MergeMixError

        raise MergeMixError(
            "objective: it uses calibrated losses; add --calibrated (after `merge-mix validate`)"
        )
    if uses_calibrated and config.halving:
        from merge_mix.errors import MergeMixError

        # The gaps were fitted at the full budget: cheaper rungs get no calibrated metrics.
        raise MergeMixError(
            "objective: calibrated losses exist at the full budget only; drop --halving"
        )
    if objective.needs_lmeval:
        from merge_mix.lmeval import metric_directions

        # A metric typo fails here, before the pool is loaded and any run directory exists.
        objective.check_lmeval_metrics(
            list(metric_directions(options["lmeval_tasks"], options.get("lmeval_include")))
        )
    scorer = ProxyScorer(pool_dir, **options)
    if config.budget_tokens is None:
        import dataclasses

        # "Every piece": the largest domain's size, so halving rungs have a number to divide.
        full = scorer.heldout_tokens or max(scorer.heldout.tokens().values())
        config = dataclasses.replace(config, budget_tokens=int(full))
    run_dir = Path(run_dir)
    result = run_search(scorer, objective, config, run_dir)
    grad = None
    done = run_dir / "gradient.json"
    if gradient is not None:
        previous = json.loads(done.read_text()) if done.is_file() else None
        if previous is not None and previous.get("config") == asdict(gradient):
            grad = previous  # a finished run resumed: the gradient search is not repeated
        else:
            grad = run_gradient(scorer, objective, config, gradient, run_dir, config.progress)
    verdict = None
    if judge_test:
        from merge_mix.search.study import attach_verdict
        from merge_mix.search.verdict import judge

        verdict = judge(scorer, objective, run_dir, progress=config.progress)
        attach_verdict(run_dir)
    report = write_report(run_dir)
    best = json.loads((run_dir / "best.json").read_text())
    n_rows = len((run_dir / "trials.jsonl").read_text().splitlines())
    return {
        "run_dir": str(run_dir),
        "n_trials": n_rows,
        "best": best,
        "verdict": verdict,
        "gradient": grad,
        "surrogate": result.surrogate,
        "halving": result.halving,
        "report_md": str(report.markdown),
        "report_html": str(report.html),
        "beats_uniform": report.beats_uniform,
        "domains": list(scorer.domains),
        "weights_best": np.asarray([best["merge_weights"][d] for d in scorer.domains]).tolist(),
    }


def format_search_summary(summary: dict[str, Any]) -> str:
    """What `merge-mix search` prints when it is done."""
    best = summary["best"]
    doms = summary["domains"]
    lines = [
        f"{summary['n_trials']} trials in {summary['run_dir']}",
        f"pick: trial {best['number']} ({best['kind']}), selected on the search split"
        f" (objective {best['objective']:.5f} there)",
        "  merge weights:      " + " ".join(f"{d}={best['merge_weights'][d]:.3f}" for d in doms),
        "  effective mixture:  "
        + " ".join(f"{d}={best['effective_mixture'][d]:.3f}" for d in doms),
    ]
    v = summary.get("verdict")
    if v:
        docs = ", ".join(f"{d} {n}" for d, n in v["documents"].items())
        lines.append(
            f"verdict on the test split ({docs} documents; {v['comparisons']['uniform']['confidence']:.0%}"
            " paired bootstrap intervals over documents):"
        )
        lines.append(f"  the pick is {v['sentence']}")
        few = [d for d, n in v["documents"].items() if n < MIN_TEST_DOCUMENTS]
        if few:
            lines.append(
                f"  warning: {', '.join(few)} has fewer than {MIN_TEST_DOCUMENTS} test documents;"
                " a bootstrap over so few understates the uncertainty (raise"
                " data.heldout_fraction)"
            )
        for name, c in v["comparisons"].items():
            if name == "uniform":
                continue
            who = name if " vs " in name else f"the pick vs {name}"
            lines.append(f"  {who}: {c['sentence']}")
        if v["fixed_terms"]:
            lines.append(
                "  (benchmark terms were held at their search values: the intervals cover the"
                " held-out terms only)"
            )
    else:
        lines.append("no verdict: the picks were not judged on the test split")
    g = summary.get("gradient")
    if g:
        eq = g["sampling_at_equal_time"]
        eq_text = f"{eq['objective']:.5f}" if eq else "nothing scored yet"
        lines.append(
            f"gradient search: objective {g['objective']:.5f} on the search split with"
            f" {g['evaluations']} evaluations in {g['wall_time_s']:.1f}s; sampling in the same"
            f" time reached {eq_text}"
        )
        lines.append(
            "  on the gradient's training slice (what it optimised): "
            + ", ".join(f"{k} {v:.5f}" for k, v in g["on_training_slice"].items())
        )
    lines.append(f"report: {summary['report_html']} (and {summary['report_md']})")
    return "\n".join(lines)
