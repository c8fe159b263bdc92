"""Validation: how faithfully merged proxies rank mixtures, measured against real models.

``merge-mix validate POOL`` (or `validate`) trains *reference* models from the pool's base,
each on the effective data mixture a set of merge weights stands for, with the components'
hyperparameters and token budget; scores each reference and the merged proxy of the same
weights with the same evaluator on the same held-out windows; and reports rank fidelity
(`merge_mix.fidelity`) per domain, on the mean loss over domains and on the worst domain,
raw and calibrated (leave-one-out), with each component's drift from the base. Optionally
also on lm-eval benchmark metrics (the same tasks for proxies and references) and on a search
objective's value.

Stages, one module each: `mixtures` (which mixtures), `references` (train or reuse the
reference models, stored in the pool), `calibrate` (calibration.json, `load_calibration`,
drift), `report` (validation.json, references.csv, report.md/html, `format_summary`).

Everything is resumable: references are committed one by one (record written last), an
interrupted one resumes from its checkpoint, and finished ones are reused (sha256-verified)
by any later validation of the pool. Several processes may validate one pool at once; each
trains the references no other process holds and waits for the rest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from merge_mix.errors import MergeMixError
from merge_mix.fidelity import MEAN_TARGET, OBJECTIVE_TARGET, WORST_TARGET
from merge_mix.objective import Objective, load_objective
from merge_mix.validate import calibrate
from merge_mix.validate.calibrate import (
    CALIBRATION,
    FIDELITY_HOLDS,
    ProxyCalibration,
    calibrated_key,
    drift_warning,
    fidelity_holds,
    load_calibration,
    loss_key,
    pool_drift,
)
from merge_mix.validate.mixtures import MIN_MIXTURES, Mixtures, load_mixtures
from merge_mix.validate.report import write_outputs
from merge_mix.validate.summary import format_summary, num

__all__ = [
    "FIDELITY_HOLDS",
    "MIN_MIXTURES",
    "ProxyCalibration",
    "drift_warning",
    "format_summary",
    "load_calibration",
    "load_mixtures",
    "validate",
]

FORMAT = "merge-mix-validation"
FORMAT_VERSION = 1
DEFAULT_HELDOUT_TOKENS = 16_384  # the same default as ProxyScorer's


def validate(
    pool_dir: str | Path,
    mixtures: Sequence[tuple[str, np.ndarray]] | str | Path | None = None,
    run_dir: str | Path | None = None,
    n_references: int = 16,
    seed: int = 0,
    heldout_tokens: int | None = DEFAULT_HELDOUT_TOKENS,
    device: str = "auto",
    keep_base: Sequence[str] = (),
    n_boot: int = 2000,
    show_progress: bool = True,
    out_dir: str | Path | None = None,
    reference_tokens: int | None = None,
    top_picks: int = 3,
    step_callback: Callable[[str, int], None] | None = None,
    lmeval_tasks: Sequence[str] = (),
    lmeval_include: str | Path | None = None,
    lmeval_limit: int | float | None = None,
    objective: str | Path | Mapping[str, Any] | Objective | None = None,
) -> dict[str, Any]:
    """Train (or reuse) references, score them and their proxies, measure fidelity, calibrate.

    `mixtures`: (label, merge weights) pairs, or a mixtures file (JSON/YAML, format in
    `merge_mix.validate.mixtures`); None for the default set of `n_references`: the search's
    picks, uniform, natural, each pure component, then seeded Dirichlet draws. `run_dir`: a
    search run directory whose top `top_picks` mixtures (best.json, trials.jsonl) come first.
    `heldout_tokens`: per-domain held-out budget for proxies and references alike.
    `keep_base`: the merge rule's keep-at-base patterns (as in eval/search).
    `reference_tokens`: train references on this many tokens instead of the components'
    budget (cheaper, but then fidelity is measured against different models: recorded, warned
    about, and the calibration is not installed in the pool). `step_callback(label, step)`
    runs after every training step of a reference (tests use it to simulate a kill).

    `lmeval_tasks` (found under `lmeval_include`, first `lmeval_limit` documents each): score
    proxies and references on these lm-eval tasks too, and measure fidelity on every metric
    they report (``lmeval/<task>/<metric>``, direction from the task), in a separate table.
    `objective` (a preset, YAML file, mapping or `Objective`, as for search; by default the
    objective recorded in `run_dir`'s run.json): also measure fidelity on that objective's
    value, raw and with leave-one-out calibrated losses; an objective with constraints gets
    its baseline mixture added when the set lacks it.

    Writes into `out_dir` (default ``<run_dir>/validation`` with a run directory, else
    ``<pool>/validation``) validation.json, references.csv, calibration.json, report.md,
    report.html and the plots, installs the calibration as ``<pool>/calibration.json`` when
    the references used the components' budget, and returns validation.json's content.
    """
    from tqdm.auto import tqdm

    from merge_mix.artifacts import library_versions
    from merge_mix.fidelity import (
        aggregate_targets,
        fidelity_table,
        fit_calibration,
        loo_fidelity,
    )
    from merge_mix.lmeval import metric_directions, task_sizes
    from merge_mix.merge import effective_mixture
    from merge_mix.model import load_model
    from merge_mix.pool import Pool
    from merge_mix.proxy import ProxyScorer
    from merge_mix.validate.mixtures import check_mixtures, default_mixtures, search_picks
    from merge_mix.validate.references import (
        ReferencePlan,
        check_epochs,
        ensure_reference,
        reference_dir,
        reference_id,
        training_spec,
    )

    started = time.perf_counter()
    pool = Pool.open(pool_dir, require_complete=True)
    domains = pool.domains
    spec = training_spec(pool)
    tokens = int(reference_tokens if reference_tokens is not None else spec.component_tokens)
    if tokens <= 0:
        raise MergeMixError(f"reference_tokens: must be > 0, got {tokens}")
    if heldout_tokens is not None and heldout_tokens <= 0:
        raise MergeMixError(f"heldout_tokens: must be > 0, got {heldout_tokens}")
    general, share = pool.general_mixture(), pool.general_share
    obj, where = None, "objective"
    if objective is None and run_dir is not None:
        objective, where = _search_objective(run_dir), f"the search's objective ({run_dir})"
    if objective is not None:
        obj = objective if isinstance(objective, Objective) else load_objective(objective, domains)
        obj.check_domains(domains)
        if obj.needs_lmeval and not lmeval_tasks:
            raise MergeMixError(f"{where}: it uses lm-eval metrics; name the tasks with --tasks")
    lmeval_tasks = list(lmeval_tasks)
    # Checks the task names (one-line error) before anything is trained.
    directions = metric_directions(lmeval_tasks, lmeval_include) if lmeval_tasks else {}

    # --- which mixtures ---
    picks: Mixtures = search_picks(run_dir, domains, top_picks) if run_dir is not None else []
    if mixtures is None:
        chosen = default_mixtures(domains, pool.natural_mixture(), n_references, seed, picks)
    elif isinstance(mixtures, (str, Path)):
        chosen = check_mixtures(picks + load_mixtures(mixtures, domains, share, general), domains)
    else:
        chosen = check_mixtures(picks + list(mixtures), domains)
    if obj is not None and obj.constraints:
        chosen = _with_baseline(chosen, obj.baseline, domains, pool.natural_mixture())
    plans = []
    for label, w in chosen:
        mix = effective_mixture(w, share, general)
        check_epochs(pool, mix, tokens)
        plans.append(ReferencePlan(reference_id(pool, mix, tokens), label, w, mix, tokens))
    weights = np.stack([p.merge_weights for p in plans])
    baselines = _baselines_by_weights(weights, domains, pool.natural_mixture())
    if out_dir is not None:
        out = Path(out_dir)
    else:  # never the run directory itself: its report.md is the search's
        out = (Path(run_dir) if run_dir is not None else pool.path) / "validation"

    # --- references ---
    scorer = ProxyScorer(
        pool,
        device=device,
        heldout_tokens=heldout_tokens,
        keep_base=tuple(keep_base),
        lmeval_tasks=lmeval_tasks,
        lmeval_include=lmeval_include,
        lmeval_limit=lmeval_limit,
    )
    # --- proxies first: cheap, and a bad objective fails here, before any training ---
    proxy_metrics, proxy_s = [], []
    for plan in tqdm(plans, desc="proxies", unit="mixture", disable=not show_progress):
        proxy_metrics.append(scorer.score(plan.merge_weights))
        proxy_s.append(scorer.last_cost_s)
    bench = [k for k in proxy_metrics[0] if k.startswith("lmeval/") and k in directions]
    undirected = [k for k in proxy_metrics[0] if k.startswith("lmeval/") and k not in directions]
    labels = [p.label for p in plans]
    keys = [loss_key(d) for d in domains]
    loss_targets = [*keys, MEAN_TARGET, WORST_TARGET]
    proxy = {k: np.array([m[k] for m in proxy_metrics]) for k in keys}
    proxy.update(aggregate_targets(proxy))
    obj_baseline = None
    if obj is not None:
        obj_baseline = baselines.get(obj.baseline)
        proxy[OBJECTIVE_TARGET] = _objective_values(
            obj, _metric_arrays(proxy_metrics, proxy, loss_targets), obj_baseline
        )
    train_args = dict(
        spec=spec,
        device=scorer.device,
        heldout=scorer.heldout,
        precision=scorer.precision,
        step_callback=step_callback,
        show_progress=show_progress,
    )
    records: dict[str, tuple[dict[str, Any], str]] = {}
    busy = []
    for plan in tqdm(plans, desc="references", unit="ref", disable=not show_progress):
        record, status = ensure_reference(pool, plan, **train_args)
        if record is None:
            busy.append(plan)
        else:
            records[plan.id] = (record, status)
    for plan in busy:  # held by other processes: wait for them (or finish what they left)
        records[plan.id] = ensure_reference(pool, plan, blocking=True, **train_args)

    # --- references: the same evaluator(s) and held-out windows as the proxies ---
    real_metrics, real_s = [], []
    for plan in tqdm(plans, desc="scoring", unit="reference", disable=not show_progress):
        t0 = time.perf_counter()
        model = load_model(reference_dir(pool, plan.id), scorer.device)
        real_metrics.append(scorer.evaluate(model))
        real_s.append(time.perf_counter() - t0)
        del model

    # --- fidelity, raw and leave-one-out calibrated ---
    real = {k: np.array([m[k] for m in real_metrics]) for k in keys}
    real.update(aggregate_targets(real))
    common = dict(baselines=baselines, domain_targets=keys, n_boot=n_boot, seed=seed)
    loo = loo_fidelity(
        weights,
        {t: proxy[t] for t in loss_targets},
        {t: real[t] for t in loss_targets},
        domains,
        n_boot=n_boot,
        seed=seed,
    )
    loo_proxy = {t: np.asarray(loo[t].pop("loo_proxy")) for t in loss_targets}
    targets = list(loss_targets)
    if obj is not None:
        targets.append(OBJECTIVE_TARGET)
        real[OBJECTIVE_TARGET] = _objective_values(
            obj, _metric_arrays(real_metrics, real, loss_targets), obj_baseline
        )
        loo_proxy[OBJECTIVE_TARGET] = _objective_values(
            obj, _metric_arrays(proxy_metrics, loo_proxy, loss_targets), obj_baseline
        )
    raw_table = fidelity_table(proxy, {t: real[t] for t in targets}, labels, **common)
    calibrated_table = fidelity_table(loo_proxy, {t: real[t] for t in targets}, labels, **common)
    bench_table = None
    if bench:
        real_bench = {b: np.array([m[b] for m in real_metrics]) for b in bench}
        bench_table = fidelity_table(
            {b: np.array([m[b] for m in proxy_metrics]) for b in bench},
            real_bench,
            labels,
            baselines=baselines,
            domain_targets=bench,
            higher_is_better={b: directions[b] for b in bench},
            n_boot=n_boot,
            seed=seed,
        )
        sizes = task_sizes(lmeval_tasks, lmeval_include, lmeval_limit)
        for b in bench:
            bench_table["targets"][b]["resolution"] = _resolution(b, real_bench[b], sizes)
    calibration = fit_calibration(
        weights, {t: proxy[t] for t in loss_targets}, {t: real[t] for t in loss_targets}, domains
    )
    drift = pool_drift(pool)

    macro = (raw_table["macro"] or {}).get("spearman", {}).get("value")
    mean_rho = raw_table["targets"][MEAN_TARGET]["spearman"]["value"]
    holds = fidelity_holds(macro, mean_rho)
    installed = tokens == spec.component_tokens
    warnings = _warnings(raw_table, calibrated_table, drift, holds, tokens, spec.component_tokens)
    if undirected:
        warnings.append(
            f"warning: no direction (higher or lower is better) for {', '.join(undirected)};"
            " left out of the benchmark table"
        )

    trained = [records[p.id] for p in plans if records[p.id][1] != "reused"]
    recorded_train_s = [records[p.id][0]["wall_time_s"] for p in plans]
    result: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "pool": str(pool.path),
        "pool_name": pool.name,
        "domains": domains,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {
            "n_mixtures": len(plans),
            "n_references": n_references if mixtures is None else None,
            "mixtures_file": str(mixtures) if isinstance(mixtures, (str, Path)) else None,
            "run_dir": None if run_dir is None else str(run_dir),
            "seed": seed,
            "heldout_tokens": heldout_tokens,
            "device": str(scorer.device),
            "keep_base": list(keep_base),
            "n_boot": n_boot,
            "reference_tokens": tokens,
            "component_tokens": spec.component_tokens,
            "references_at_component_budget": installed,
            "general_share": share,
            "lmeval_tasks": lmeval_tasks,
            "lmeval_include": None if lmeval_include is None else str(lmeval_include),
            "lmeval_limit": lmeval_limit,
        },
        "targets": targets,
        "benchmark_targets": bench,
        "objective": None if obj is None else obj.to_dict(),
        "mixtures": [
            {
                "label": p.label,
                "reference": p.id,
                "status": records[p.id][1],
                "resumed_from_step": records[p.id][0]["resumed_from_step"]
                if records[p.id][1] == "resumed"
                else None,
                "merge_weights": _by_domain(domains, p.merge_weights),
                "effective_mixture": _by_domain(domains, p.mixture),
                "proxy": {
                    **proxy_metrics[i],
                    **{t: float(proxy[t][i]) for t in targets[len(keys) :]},
                },
                "real": {**real_metrics[i], **{t: float(real[t][i]) for t in targets[len(keys) :]}},
                "calibrated_loo": {calibrated_key(t): float(loo_proxy[t][i]) for t in targets},
                "reference_train_s": records[p.id][0]["wall_time_s"],
                "proxy_score_s": proxy_s[i],
                "reference_score_s": real_s[i],
            }
            for i, p in enumerate(plans)
        ],
        "fidelity": {"raw": raw_table, "calibrated": calibrated_table, "benchmarks": bench_table},
        "loo": loo,
        "verdict": {
            "holds": holds,
            "threshold": FIDELITY_HOLDS,
            "macro_spearman": macro,
            "mean_loss_spearman": mean_rho,
            "mean_loss_spearman_calibrated": calibrated_table["targets"][MEAN_TARGET]["spearman"][
                "value"
            ],
            "objective_spearman": _rho(raw_table, OBJECTIVE_TARGET),
            "objective_spearman_calibrated": _rho(calibrated_table, OBJECTIVE_TARGET),
            "benchmark_macro_spearman": None
            if bench_table is None
            else bench_table["macro"]["spearman"]["value"],
        },
        "calibration": {
            "installed": str(pool.path / CALIBRATION) if installed else None,
            "file": str(out / CALIBRATION),
            "fit": calibration.to_dict(),
        },
        "drift": drift,
        "warnings": warnings,
        "costs": {
            "references_trained": len(trained),
            "references_reused": len(plans) - len(trained),
            "reference_train_s_this_run": float(sum(r["wall_time_s"] for r, _ in trained)),
            "reference_train_s_per_mixture": float(np.mean(recorded_train_s)),
            "proxy_score_s_per_mixture": float(np.mean(proxy_s)),
            "reference_score_s_per_mixture": float(np.mean(real_s)),
            "proxy_speedup": float(np.mean(recorded_train_s) / max(np.mean(proxy_s), 1e-9)),
            "total_s": time.perf_counter() - started,
        },
        "versions": library_versions(),
    }
    calibration_record = {
        "format": calibrate.FORMAT,
        "format_version": calibrate.FORMAT_VERSION,
        "pool": pool.name,
        "created_at": result["created_at"],
        "domains": domains,
        "components_sha256": {d: pool.manifest["components"][d].get("sha256") for d in domains},
        "base_sha256": pool.manifest["base"].get("sha256"),
        "keep_base": list(keep_base),
        "heldout_tokens": heldout_tokens,
        "reference_tokens": tokens,
        "component_tokens": spec.component_tokens,
        "keys": {t: calibrated_key(t) for t in loss_targets},
        "references": [
            {"id": p.id, "label": p.label, "merge_weights": _by_domain(domains, p.merge_weights)}
            for p in plans
        ],
        "calibration": calibration.to_dict(),
        "loo": {
            t: {side: loo[t][side] for side in ("raw", "calibrated")} | {"forms": loo[t]["forms"]}
            for t in loss_targets
        },
        "drift": drift,
        "fidelity": result["verdict"],
        "validation": str(out / "validation.json"),
        "versions": result["versions"],
    }
    write_outputs(result, calibration_record, out, pool.path / CALIBRATION if installed else None)
    return result


def _baselines_by_weights(
    weights: np.ndarray, domains: Sequence[str], natural: np.ndarray
) -> dict[str, int]:
    """Uniform and natural among mixtures given under other labels (e.g. from a file)."""
    out = {}
    for name, target in _baseline_weights(domains, natural).items():
        hits = np.flatnonzero(np.abs(weights - target).max(axis=1) < 1e-6)
        if hits.size:
            out[name] = int(hits[0])
    return out


def _baseline_weights(domains: Sequence[str], natural: np.ndarray) -> dict[str, np.ndarray]:
    """The merge weights of the uniform and natural baseline mixtures."""
    return {"uniform": np.full(len(domains), 1.0 / len(domains)), "natural": np.asarray(natural)}


def _search_objective(run_dir: str | Path) -> dict[str, Any] | None:
    """The objective a search run recorded in its run.json, if it did."""
    from merge_mix.artifacts import read_json

    path = Path(run_dir) / "run.json"
    if not path.is_file():
        return None
    try:
        objective = read_json(path).get("objective")
    except (OSError, ValueError, AttributeError) as exc:
        raise MergeMixError(f"{path}: unreadable search run record ({exc})") from None
    if objective is not None and not isinstance(objective, dict):
        raise MergeMixError(f"{path}: field 'objective' is not a mapping")
    return objective


def _with_baseline(
    chosen: Mixtures, baseline: str, domains: Sequence[str], natural: np.ndarray
) -> Mixtures:
    """`chosen`, plus the objective's baseline mixture (its constraints compare against it)
    when no mixture of the set has its weights."""
    if baseline in _baselines_by_weights(np.stack([w for _, w in chosen]), domains, natural):
        return chosen
    target = _baseline_weights(domains, natural)[baseline]
    taken = {label for label, _ in chosen}
    label = baseline if baseline not in taken else f"{baseline} (objective baseline)"
    return [*chosen, (label, np.asarray(target, dtype=np.float64))]


def _metric_arrays(
    metrics: Sequence[Mapping[str, float]],
    losses: Mapping[str, np.ndarray],
    loss_targets: Sequence[str],
) -> dict[str, np.ndarray]:
    """Every metric as an array over mixtures, the way an objective reads them, with the
    loss targets taken from `losses` (raw, real or calibrated): per-domain losses under
    their own keys, and every loss target under its ``calibrated/...`` key too."""
    arrays = {k: np.array([m[k] for m in metrics]) for k in metrics[0]}
    for t in loss_targets:
        if t.startswith("heldout/"):
            arrays[t] = np.asarray(losses[t])
        arrays[calibrated_key(t)] = np.asarray(losses[t])
    return arrays


def _objective_values(
    objective: Objective, arrays: Mapping[str, np.ndarray], baseline: int | None
) -> np.ndarray:
    """The objective (lower is better) of every mixture; constraints compare with the
    baseline mixture's own metrics on the same side (proxy, calibrated or real)."""
    base = None
    if objective.constraints and baseline is not None:
        base = {k: float(v[baseline]) for k, v in arrays.items()}
    return np.asarray(objective.evaluate(arrays, base).value, dtype=np.float64)


PROPORTIONS = ("acc", "acc_norm", "exact_match")
"""lm-eval metrics that are a mean of 0/1 item scores, whose sampling error is binomial."""
RESOLVED_SPREAD = 4.0
"""A proportion metric "resolves" the references when their real scores span at least this
many standard errors of one score."""


def _resolution(target: str, real: np.ndarray, sizes: Mapping[str, int]) -> dict | None:
    """For a proportion metric: items scored, the binomial standard error of one score at the
    references' mean, the span of their real scores, and whether that span exceeds
    RESOLVED_SPREAD standard errors (16 independent scores of equal models would span about
    3.5). None for other metrics. The references share the items, so differences between them
    are less noisy than this per-score error: the test is conservative."""
    _, task, metric = target.split("/", 2)
    n = sizes.get(task)
    if metric.split(",")[0] not in PROPORTIONS or not n:
        return None
    p = float(np.clip(real.mean(), 0.0, 1.0))
    se = float(np.sqrt(p * (1 - p) / n))
    spread = float(real.max() - real.min())
    return {
        "items": int(n),
        "standard_error": se,
        "real_spread": spread,
        "resolved": spread >= RESOLVED_SPREAD * se,
    }


def _rho(table: Mapping[str, Any], target: str) -> float | None:
    entry = table["targets"].get(target)
    return None if entry is None else entry["spearman"]["value"]


def _by_domain(domains: Sequence[str], values: np.ndarray) -> dict[str, float]:
    return {d: float(v) for d, v in zip(domains, values, strict=True)}


def _warnings(raw, calibrated, drift, holds, tokens, component_tokens) -> list[str]:
    """The lines a user must read before trusting the proxies (printed by the CLI)."""
    out = []
    if tokens != component_tokens:
        out.append(
            f"warning: references were trained on {tokens:,} tokens, not the components'"
            f" {component_tokens:,}: this measures fidelity against other models; the"
            " calibration was not installed in the pool"
        )
    if not holds:
        mean = raw["targets"]["mean_loss"]["spearman"]
        cal = calibrated["targets"]["mean_loss"]["spearman"]["value"]
        macro = (raw["macro"] or {}).get("spearman", {}).get("value")
        out.append(
            f"warning: raw proxy fidelity does not hold at component drift up to"
            f" {drift['max']:.3g}: Spearman on the mean loss {num(mean['value'])}"
            f" [{num(mean['low'])}, {num(mean['high'])}], macro over domains {num(macro)}"
            f" (threshold {FIDELITY_HOLDS}); leave-one-out calibrated: {num(cal)}"
            + ("; prefer --calibrated" if cal is not None and cal > (mean["value"] or -1) else "")
        )
    return out
