"""Paired intervals over test documents for a validation, and its seed-noise floor.

Every difference `validate` reports between two models scored on the same test documents
carries a paired bootstrap interval over those documents (`merge_mix.compare`, stratified by
domain): the regret of a pick against the best reference, a pick's gain over the uniform and
natural mixtures, and each mixture's proxy-minus-real gap. The rank correlations keep their
own bootstrap over mixtures (`merge_mix.validate.metrics`).

The *seed-noise floor* of a target is the largest difference (in absolute value) between two
models trained by the same recipe with different seeds: a reference and its extra seeds
(``validate --seeds``), and, when the references used the components' budget and the merge
keeps nothing at the base, a pure-mixture reference and the pool's component of that domain
(the same recipe, another data seed; the one-hot proxy is the component itself). A regret or a
gain smaller than the floor is "below the seed-noise floor": retraining could flip it.
`seeded_mixtures` picks the mixtures that get extra seeds, `component_evidence` the
pure-mixture references that count as evidence.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from merge_mix.compare import compare_models
from merge_mix.errors import MergeMixError
from merge_mix.evaluate import DocumentScores
from merge_mix.validate.metrics import MEAN_TARGET, OBJECTIVE_TARGET, WORST_TARGET

DEFAULT_SEED_MIXTURES = ("uniform",)
"""The mixtures that get extra seeds unless told otherwise."""


def target_values(
    targets: Sequence[str],
    domains: Sequence[str],
    objective: Callable[[Mapping[str, float], Mapping[str, float] | None], float] | None = None,
) -> dict[str, Callable[..., float]]:
    """For each target, a function of one model's metrics (and its objective baseline's,
    for the objective target) giving the target's value: a domain's loss, their mean, the
    worst domain, or the objective."""
    keys = [f"heldout/{d}/loss" for d in domains]
    out: dict[str, Callable[..., float]] = {}
    for t in targets:
        if t == MEAN_TARGET:
            out[t] = lambda m, base=None: float(np.mean([m[k] for k in keys]))
        elif t == WORST_TARGET:
            out[t] = lambda m, base=None: float(np.max([m[k] for k in keys]))
        elif t == OBJECTIVE_TARGET:
            if objective is None:
                raise ValueError("target 'objective' needs an objective")
            out[t] = objective
        else:
            out[t] = lambda m, base=None, key=t: float(m[key])
    return out


def paired_intervals(
    scores: Mapping[str, Mapping[str, DocumentScores]],
    requests: Sequence[tuple[str, str, str]],
    values: Mapping[str, Callable[..., float]],
    fixed: Mapping[str, Mapping[str, float]] | None = None,
    baseline_of: Mapping[str, str] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Paired bootstrap intervals of value(a) - value(b) for every (target, a, b) request,
    all from one set of document resamples.

    `scores` maps a model's name to its per-domain test document scores; `values` maps a
    target to its value function (`target_values`); `fixed` adds metrics that are not
    resampled (lm-eval scores) to a model's held-out ones; `baseline_of` names, per model,
    the model whose metrics on the same resample an objective's constraints compare with."""
    fixed, baseline_of = dict(fixed or {}), dict(baseline_of or {})
    needed = sorted({(t, name) for t, a, b in requests for name in (a, b)})

    def compute(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
        full = {name: {**m, **fixed.get(name, {})} for name, m in metrics.items()}
        out = {}
        for t, name in needed:
            base = baseline_of.get(name)
            out[f"{t}|{name}"] = values[t](full[name], None if base is None else full[base])
        return out

    pairs = [(f"{t}|{a}", f"{t}|{b}") for t, a, b in requests]
    if not pairs:
        return {}
    result = compare_models(scores, compute, pairs, n_boot, confidence, seed)
    return {req: result[pair].to_dict() for req, pair in zip(requests, pairs, strict=True)}


def interval(c: Mapping[str, Any], negate: bool = False) -> dict[str, Any]:
    """A comparison as {value, low, high, verdict}; `negate` turns value(a) - value(b) into
    value(b) - value(a) (a gain: how much lower a's loss is). The verdict always reads a
    against b: "better" when a's value is lower throughout the interval."""
    if negate:
        # + 0.0 turns -0.0 (a model against itself) into 0.0.
        return {
            "value": -c["delta"] + 0.0,
            "low": -c["hi"] + 0.0,
            "high": -c["lo"] + 0.0,
            "verdict": c["verdict"],
        }
    return {"value": c["delta"], "low": c["lo"], "high": c["hi"], "verdict": c["verdict"]}


def seed_floor(
    evidence: Mapping[str, list[dict[str, Any]]],
) -> dict[str, float | None]:
    """Per target, the floor: the largest absolute difference among the evidence pairs
    (None without evidence)."""
    return {t: max((abs(e["value"]) for e in items), default=None) for t, items in evidence.items()}


def below_floor(amount: float | None, floor: float | None) -> bool | None:
    """Whether a regret or gain is smaller in size than the seed-noise floor (None when
    either is unknown)."""
    if amount is None or floor is None:
        return None
    return bool(abs(amount) < floor)


def measure_intervals(
    tables: Mapping[str, dict[str, Any]],
    targets: Sequence[str],
    labels: Sequence[str],
    scores: Mapping[str, Mapping[str, DocumentScores]],
    values: Mapping[str, Callable[..., float]],
    fixed: Mapping[str, Mapping[str, float]],
    baseline_of: Mapping[str, str],
    seed_pairs: Sequence[tuple[int, str, int]],
    components: Sequence[tuple[int, str]],
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Add paired intervals and the seed-noise floor to fidelity tables, in place.

    `scores` names models ``real:<i>`` and ``proxy:<i>`` (mixture i's reference and proxy)
    and the extra-seed references; `seed_pairs` lists (mixture i, extra-seed model, its seed)
    and `components` (mixture i, domain) for the pure-mixture references trained by their
    component's recipe (``proxy:<i>`` is then the component). Each table entry of `targets`
    gets ``seed_floor``, its regret and every baseline gain an ``interval`` ({value, low, high,
    verdict}; a gain's is the baseline's value minus the pick's) and ``below_seed_floor``
    (None when the pick is the best reference, or the baseline, itself).

    Returns {"floor": {split, confidence, n_boot, targets: {target: {floor, evidence}}},
    "gaps": [{target: proxy-minus-real interval} per mixture]}."""
    index = {label: i for i, label in enumerate(labels)}

    def against(e: Mapping[str, Any]) -> list[tuple[str, str]]:
        pick = f"real:{index[e['regret']['pick']]}"
        out = [(pick, f"real:{index[e['regret']['best']]}")]
        out += [(pick, f"real:{index[g['mixture']]}") for g in e["baselines"].values()]
        return out

    requests = [
        (t, a, b)
        for table in tables.values()
        for t in targets
        for a, b in against(table["targets"][t])
    ]
    requests += [(t, f"proxy:{i}", f"real:{i}") for i in range(len(labels)) for t in targets]
    requests += [(t, name, f"real:{i}") for i, name, _ in seed_pairs for t in targets]
    requests += [(t, f"real:{i}", f"proxy:{i}") for i, _ in components for t in targets]
    res = paired_intervals(
        scores,
        list(dict.fromkeys(requests)),
        values,
        fixed,
        baseline_of,
        n_boot,
        seed,
        confidence,
    )
    evidence: dict[str, list[dict[str, Any]]] = {t: [] for t in targets}
    for t in targets:
        for i, name, s in seed_pairs:
            evidence[t].append(
                {"kind": "seed", "mixture": labels[i], "seeds": [s, 0]}
                | interval(res[(t, name, f"real:{i}")])
            )
        for i, d in components:
            evidence[t].append(
                {"kind": "component", "mixture": labels[i], "component": d}
                | interval(res[(t, f"real:{i}", f"proxy:{i}")])
            )
    floor = seed_floor(evidence)
    for table in tables.values():
        for t in targets:
            e = table["targets"][t]
            e["seed_floor"] = floor[t]
            (pick, best), *rest = against(e)
            # A pick compared with itself (it is the best, or the baseline) is no finding:
            # its below_seed_floor is None.
            e["regret"]["interval"] = interval(res[(t, pick, best)])
            e["regret"]["below_seed_floor"] = (
                None if pick == best else below_floor(e["regret"]["absolute"], floor[t])
            )
            for g, (a, b) in zip(e["baselines"].values(), rest, strict=True):
                g["interval"] = interval(res[(t, a, b)], negate=True)
                g["below_seed_floor"] = None if a == b else below_floor(g["gain"], floor[t])
    return {
        "floor": {
            "split": "test",
            "confidence": confidence,
            "n_boot": n_boot,
            "targets": {t: {"floor": floor[t], "evidence": evidence[t]} for t in targets},
        },
        "gaps": [
            {t: interval(res[(t, f"proxy:{i}", f"real:{i}")]) for t in targets}
            for i in range(len(labels))
        ],
    }


def seeded_mixtures(
    names: Sequence[str] | None, seeds: int, plans: Sequence, baselines: Mapping[str, int]
) -> tuple[list[int], list[str]]:
    """Indices of the mixtures (`plans`, with labels) that get extra seeds: those named (a
    label, or a baseline of `baselines`; default DEFAULT_SEED_MIXTURES, skipped with a
    warning when absent), none with one seed; and the warnings."""
    if seeds < 2:
        return [], []
    given = names is not None
    labels = [p.label for p in plans]
    out, warnings = [], []
    for name in DEFAULT_SEED_MIXTURES if names is None else names:
        if name in labels:
            i = labels.index(name)
        elif name in baselines:
            i = baselines[name]
        elif given:
            raise MergeMixError(
                f"seed_mixtures: {name!r} is not a mixture of this validation"
                f" (labels: {', '.join(labels)})"
            )
        else:
            warnings.append(
                f"warning: no {name} mixture among the references: no extra seeds, no"
                " seed-noise floor from them"
            )
            continue
        if i not in out:
            out.append(i)
    return out, warnings


def component_evidence(pool, plans, tokens: int, component_tokens: int, keep_base) -> list:
    """(mixture index, domain) of every pure-mixture reference trained by its component's
    recipe (same budget, same data mixture, another seed), whose one-hot proxy is the
    component itself (nothing kept at the base): evidence of the seed-noise floor."""
    if tokens != component_tokens or keep_base:
        return []
    out = []
    for i, plan in enumerate(plans):
        hot = np.flatnonzero(plan.merge_weights > 1 - 1e-9)
        if hot.size != 1:
            continue
        d = pool.domains[int(hot[0])]
        recorded = pool.manifest["components"][d].get("training_mixture")
        if recorded is None or pool.manifest["components"][d].get("imported"):
            continue  # an imported component was trained by another recipe, not another seed
        mix = np.array([float(recorded.get(x, 0.0)) for x in pool.domains])
        if np.abs(mix - plan.mixture).max() < 1e-6:
            out.append((i, d))
    return out
