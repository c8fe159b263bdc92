"""`validate`: train or reuse references, score them and their proxies, measure, calibrate.

The body of ``merge-mix validate POOL`` (the stages are described in `merge_mix.validate`):
choose the mixtures, train or reuse the references (and extra seeds of some), score references
and proxies on the same held-out documents (and lm-eval tasks, and a search objective), measure
raw and leave-one-out calibrated fidelity with paired intervals and the seed-noise floor, fit
and install the calibration, and write the outputs.

Two held-out splits, never mixed: every fidelity figure, regret, gain and the seed floor is
measured on the ``test`` split (every piece); the calibration is fitted on the ``search``
split (the `heldout_tokens` budget the searches score with), and its leave-one-out fidelity,
fitted on search, is judged on test.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from merge_mix.errors import MergeMixError
from merge_mix.objective import Objective, load_objective
from merge_mix.validate import proxy_calibration
from merge_mix.validate.drift import pool_drift
from merge_mix.validate.metrics import (
    FIDELITY_HOLDS,
    MEAN_TARGET,
    OBJECTIVE_TARGET,
    WORST_TARGET,
    aggregate_targets,
    fidelity_holds,
)
from merge_mix.validate.mixtures import Mixtures, load_mixtures
from merge_mix.validate.proxy_calibration import (
    CALIBRATION,
    calibrated_key,
    loss_key,
)
from merge_mix.validate.report import write_outputs
from merge_mix.validate.summary import num

FORMAT = "merge-mix-validation"
FORMAT_VERSION = 2
DEFAULT_HELDOUT_TOKENS = None  # every search piece: the default of eval, search and validate
SPLITS = {"judged_on": "test", "calibration_fitted_on": "search"}


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
    seeds: int = 2,
    seed_mixtures: Sequence[str] | None = None,
    verify: str = "cached",
) -> dict[str, Any]:
    """Train (or reuse) references, score them and their proxies, measure fidelity, calibrate.

    `mixtures`: (label, merge weights) pairs, or a mixtures file (JSON/YAML, format in
    `merge_mix.validate.mixtures`); None for the default set of `n_references`: the search's
    picks, uniform, natural, each pure component, then seeded Dirichlet draws. `run_dir`: a
    search run directory whose top `top_picks` mixtures (best.json, trials.jsonl) come first.
    `heldout_tokens`: per-domain budget of the search split, on which proxies and references
    alike are scored to fit the calibration (the searches' budget); the fidelity figures use
    every piece of the test split.
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

    `seeds`: training seeds of each mixture named in `seed_mixtures` (default: uniform; a
    label, or "uniform"/"natural" whatever their label): seeds 1 .. seeds-1 are trained as
    extra references of the same recipe, and their differences from seed 0 on the test
    documents are the seed-noise floor reported next to every regret and gain (1: none).
    `verify`: how the pool's weights are checked against their sha256 (``cached``, ``full``).

    Writes into `out_dir` (default ``<run_dir>/validation`` with a run directory, else
    ``<pool>/validation``) validation.json, references.csv, calibration.json, report.md,
    report.html and the plots, installs the calibration as ``<pool>/calibration.json`` when
    the references used the components' budget, and returns validation.json's content.
    """
    from tqdm.auto import tqdm

    from merge_mix.artifacts import library_versions
    from merge_mix.evaluate import (
        TARGET_PREFIX,
        document_scores,
        metric_prefix,
        metrics_from_documents,
    )
    from merge_mix.lmeval import metric_directions, task_sizes
    from merge_mix.merge import effective_mixture
    from merge_mix.model import load_model
    from merge_mix.pool import Pool
    from merge_mix.proxy import ProxyScorer, stderr_notice
    from merge_mix.validate.calibration import fit_calibration, loo_fidelity
    from merge_mix.validate.intervals import (
        component_evidence,
        measure_intervals,
        seeded_mixtures,
        target_values,
    )
    from merge_mix.validate.metrics import fidelity_table
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
    if seeds < 1:
        raise MergeMixError(f"seeds: must be at least 1, got {seeds}")
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
    if obj is not None and obj.needs_lmeval:
        # A metric typo fails here, before any proxy is scored or any file is written.
        obj.check_lmeval_metrics(list(directions))

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
    seeded, seed_warnings = seeded_mixtures(seed_mixtures, seeds, plans, baselines)
    seed_plans = [
        (
            i,
            ReferencePlan(
                reference_id(pool, plans[i].mixture, tokens, s),
                plans[i].label,
                plans[i].merge_weights,
                plans[i].mixture,
                tokens,
                s,
            ),
        )
        for i in seeded
        for s in range(1, seeds)
    ]
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
        verify=verify,
        notice=stderr_notice,
    )
    test_set = scorer.test_set()

    def test_scores(model) -> dict[str, Any]:
        return document_scores(model, test_set, scorer.device, scorer.precision, scorer.batch_size)

    # --- proxies first: cheap, and a bad objective fails here, before any training ---
    # Each side is scored twice: the search split (scorer.score/evaluate: held-out and
    # lm-eval metrics) to fit the calibration, and the test split (per document) to judge.
    proxy_search, proxy_docs, proxy_s = [], [], []
    for plan in tqdm(plans, desc="proxies", unit="mixture", disable=not show_progress):
        proxy_search.append(scorer.score(plan.merge_weights))
        proxy_s.append(scorer.last_cost_s)
        proxy_docs.append(scorer.document_scores(plan.merge_weights, "test"))
    bench = [k for k in proxy_search[0] if k.startswith("lmeval/") and k in directions]
    undirected = [k for k in proxy_search[0] if k.startswith("lmeval/") and k not in directions]
    proxy_metrics = [
        _test_metrics(docs, m) for docs, m in zip(proxy_docs, proxy_search, strict=True)
    ]
    labels = [p.label for p in plans]
    keys = [loss_key(d) for d in domains]
    # Target sets are judged like domains, but stay out of the mean and worst domain.
    set_keys = [f"{metric_prefix(TARGET_PREFIX + t)}/loss" for t in pool.targets]
    loss_targets = [*keys, MEAN_TARGET, WORST_TARGET, *set_keys]
    proxy = _loss_arrays(proxy_metrics, keys, set_keys)
    proxy_fit = _loss_arrays(proxy_search, keys, set_keys)
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
    every_plan = plans + [plan for _, plan in seed_plans]
    for plan in tqdm(every_plan, desc="references", unit="ref", disable=not show_progress):
        record, status = ensure_reference(pool, plan, **train_args)
        if record is None:
            busy.append(plan)
        else:
            records[plan.id] = (record, status)
    for plan in busy:  # held by other processes: wait for them (or finish what they left)
        records[plan.id] = ensure_reference(pool, plan, blocking=True, **train_args)

    # --- references: the same evaluator(s) and held-out documents as the proxies ---
    real_search, real_docs, real_s = [], [], []
    for plan in tqdm(plans, desc="scoring", unit="reference", disable=not show_progress):
        t0 = time.perf_counter()
        model = load_model(reference_dir(pool, plan.id), scorer.device)
        real_search.append(scorer.evaluate(model))
        real_s.append(time.perf_counter() - t0)
        real_docs.append(test_scores(model))
        del model
    seed_docs, seed_fixed = [], []
    for _, plan in seed_plans:
        model = load_model(reference_dir(pool, plan.id), scorer.device)
        seed_docs.append(test_scores(model))
        # Only an objective reading lm-eval scores needs them (the held-out part of this call,
        # one piece per domain, is not used: the test documents above are).
        lmeval = scorer.evaluate(model, budget_tokens=1) if scorer.lmeval_tasks else {}
        seed_fixed.append({k: v for k, v in lmeval.items() if k.startswith("lmeval/")})
        del model
    real_metrics = [_test_metrics(docs, m) for docs, m in zip(real_docs, real_search, strict=True)]

    # --- fidelity on test, raw and leave-one-out calibrated (fitted on search) ---
    real = _loss_arrays(real_metrics, keys, set_keys)
    real_fit = _loss_arrays(real_search, keys, set_keys)
    common = dict(baselines=baselines, domain_targets=keys, n_boot=n_boot, seed=seed)
    loo = loo_fidelity(
        weights,
        {t: proxy_fit[t] for t in loss_targets},
        {t: real_fit[t] for t in loss_targets},
        domains,
        n_boot=n_boot,
        seed=seed,
        proxy_eval={t: proxy[t] for t in loss_targets},
        real_eval={t: real[t] for t in loss_targets},
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
    # The pool's calibration (read by `search --calibrated`) covers the domains: a target
    # set added later must not invalidate it. Target sets are calibrated leave-one-out above.
    fitted = [*keys, MEAN_TARGET, WORST_TARGET]
    calibration = fit_calibration(
        weights,
        {t: proxy_fit[t] for t in fitted},
        {t: real_fit[t] for t in fitted},
        domains,
    )
    drift = pool_drift(pool)

    # --- paired intervals over test documents, and the seed-noise floor ---
    scores = {f"real:{i}": d for i, d in enumerate(real_docs)}
    scores.update({f"proxy:{i}": d for i, d in enumerate(proxy_docs)})
    scores.update({f"seed:{j}": d for j, d in enumerate(seed_docs)})
    fixed = {f"real:{i}": _lmeval(m) for i, m in enumerate(real_search)}
    fixed.update({f"proxy:{i}": _lmeval(m) for i, m in enumerate(proxy_search)})
    fixed.update({f"seed:{j}": f for j, f in enumerate(seed_fixed)})
    baseline_of: dict[str, str] = {}
    if obj is not None and obj.constraints and obj_baseline is not None:
        baseline_of = {n: f"{n.split(':')[0]}:{obj_baseline}" for n in scores}
        baseline_of.update(
            {
                f"seed:{j}": f"seed:{j}" if i == obj_baseline else f"real:{obj_baseline}"
                for j, (i, _) in enumerate(seed_plans)
            }
        )
    components = component_evidence(pool, plans, tokens, spec.component_tokens, keep_base)
    noise = measure_intervals(
        {"raw": raw_table, "calibrated": calibrated_table},
        targets,
        labels,
        scores,
        target_values(targets, domains, None if obj is None else _objective_fn(obj)),
        fixed,
        baseline_of,
        [(i, f"seed:{j}", plan.seed) for j, (i, plan) in enumerate(seed_plans)],
        components,
        n_boot=n_boot,
        seed=seed,
    )

    macro = (raw_table["macro"] or {}).get("spearman", {}).get("value")
    mean_rho = raw_table["targets"][MEAN_TARGET]["spearman"]["value"]
    holds = fidelity_holds(macro, mean_rho)
    installed = tokens == spec.component_tokens
    warnings = _warnings(raw_table, calibrated_table, drift, holds, tokens, spec.component_tokens)
    warnings += seed_warnings
    if undirected:
        warnings.append(
            f"warning: no direction (higher or lower is better) for {', '.join(undirected)};"
            " left out of the benchmark table"
        )

    trained = [records[p.id] for p in every_plan if records[p.id][1] != "reused"]
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
            "seeds": seeds,
            "seed_mixtures": [plans[i].label for i in seeded],
        },
        "splits": {
            **SPLITS,
            "test": {"documents": test_set.documents(), "tokens": test_set.tokens()},
            "search": {
                "documents": scorer.heldout.documents(heldout_tokens),
                "tokens": scorer.heldout.tokens(heldout_tokens),
                "heldout_tokens": heldout_tokens,
            },
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
                "proxy_minus_real": noise["gaps"][i],
                "proxy_search": proxy_search[i],
                "real_search": real_search[i],
                "calibrated_loo": {calibrated_key(t): float(loo_proxy[t][i]) for t in targets},
                "reference_train_s": records[p.id][0]["wall_time_s"],
                "proxy_score_s": proxy_s[i],
                "reference_score_s": real_s[i],
            }
            for i, p in enumerate(plans)
        ],
        "fidelity": {"raw": raw_table, "calibrated": calibrated_table, "benchmarks": bench_table},
        "seed_floor": noise["floor"],
        "seed_references": [
            {
                "mixture": plans[i].label,
                "seed": plan.seed,
                "reference": plan.id,
                "seed_0_reference": plans[i].id,
                "status": records[plan.id][1],
                "real": metrics_from_documents(seed_docs[j]),
            }
            for j, (i, plan) in enumerate(seed_plans)
        ],
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
            "references_reused": len(every_plan) - len(trained),
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
        "format": proxy_calibration.FORMAT,
        "format_version": proxy_calibration.FORMAT_VERSION,
        "pool": pool.name,
        "created_at": result["created_at"],
        "domains": domains,
        "components_sha256": {d: pool.manifest["components"][d].get("sha256") for d in domains},
        "base_sha256": pool.manifest["base"].get("sha256"),
        "keep_base": list(keep_base),
        "split": SPLITS["calibration_fitted_on"],
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
        "loo_judged_on": SPLITS["judged_on"],
        "drift": drift,
        "fidelity": result["verdict"],
        "validation": str(out / "validation.json"),
        "versions": result["versions"],
    }
    write_outputs(result, calibration_record, out, pool.path / CALIBRATION if installed else None)
    return result


def _loss_arrays(
    metrics: Sequence[Mapping[str, float]], keys: Sequence[str], set_keys: Sequence[str] = ()
):
    """Per-domain losses as arrays over mixtures, with their mean and worst domain, and
    the target sets' losses (`set_keys`, not in the mean or worst)."""
    out = {k: np.array([m[k] for m in metrics]) for k in keys}
    out.update(aggregate_targets(out))
    out.update({k: np.array([m[k] for m in metrics]) for k in set_keys})
    return out


def _lmeval(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith("lmeval/")}


def _test_metrics(docs: Mapping[str, Any], search: Mapping[str, float]) -> dict[str, float]:
    """A model's test-split held-out metrics (from its document scores), with its lm-eval
    scores (which do not depend on the split)."""
    from merge_mix.evaluate import metrics_from_documents

    return {**metrics_from_documents(docs), **_lmeval(search)}


def _objective_fn(objective: Objective):
    """The objective of one model's metrics (read as `_objective_values` reads them),
    constraints against its baseline's metrics."""

    def full(metrics: Mapping[str, float]) -> dict[str, float]:
        keys = [k for k in metrics if k.startswith("heldout/") and k.endswith("/loss")]
        arrays = _metric_arrays(
            [metrics], _loss_arrays([metrics], keys), [*keys, MEAN_TARGET, WORST_TARGET]
        )
        return {k: float(v[0]) for k, v in arrays.items()}

    def value(metrics: Mapping[str, float], base: Mapping[str, float] | None = None) -> float:
        return float(objective.evaluate(full(metrics), None if base is None else full(base)).value)

    return value


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
        if t.startswith(("heldout/", "target/")):
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
