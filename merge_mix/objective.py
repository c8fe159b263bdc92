"""The search objective: a list of weighted metric terms, summed into one scalar to minimise.

The objective is data. Each `Term` picks metrics from the scorer's output by name —
`heldout/<domain>/<loss|ppl|bpb>` or `lmeval/<task>/<metric>` — reduces them over the
matched domains or tasks (mean, max or min), signs them by direction and weighs them:

    objective = sum(term.weight * term.sign * reduce(matched values)) + penalty * violation

Optional `Constraint`s keep metrics within a relative tolerance of a baseline mixture's
metrics (the uniform mixture unless told otherwise); a mixture that breaks one is
*infeasible*, and the summed relative excess, times `penalty`, is added to its objective.

Objectives come from a preset string or a YAML file, for example::

    terms:
      - {source: heldout, metric: loss, name: "*", reduce: mean}
      - {source: lmeval, metric: acc, name: mmx_choice_code, weight: 0.5, direction: maximize}
    constraints:
      - {source: heldout, metric: loss, name: "*", exclude: [code], tolerance: 0.02}
    baseline: uniform
    penalty: 100.0

Presets: `mean_loss` (mean held-out loss over domains), `worst_loss` (the largest held-out
loss), `target:<domain>` or `target:<domain>:<tolerance>` (minimise that domain's held-out loss
while every other domain's stays within the tolerance, default 2%, of the uniform mixture's),
`target-set:<name>` (minimise the loss on the pool's target set `<name>`, evaluation-only
data: the term ``{source: target, metric: loss, name: <name>}``, metric
``target/<name>/loss``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from merge_mix.errors import MergeMixError

SOURCES = ("heldout", "target", "lmeval", "calibrated")
HELDOUT_METRICS = ("loss", "ppl", "bpb")
DIRECTIONS = ("minimize", "maximize")
REDUCTIONS = ("mean", "max", "min")
BASELINES = ("uniform", "natural")
PRESETS = ("mean_loss", "worst_loss", "target:<domain>", "target-set:<name>")
DEFAULT_TOLERANCE = 0.02
DEFAULT_PENALTY = 100.0

_TERM_KEYS = ("source", "metric", "name", "weight", "direction", "reduce")
_CONSTRAINT_KEYS = ("source", "metric", "name", "exclude", "tolerance", "direction")
_OBJECTIVE_KEYS = ("name", "terms", "constraints", "baseline", "penalty")


def _check_source_metric(where: str, source: str, metric: str) -> None:
    if source not in SOURCES:
        raise MergeMixError(f"{where}.source: {source!r} is not one of {', '.join(SOURCES)}")
    if source == "calibrated" and metric != "loss":
        raise MergeMixError(f"{where}.metric: calibrated metrics are losses only ('loss')")
    if source in ("heldout", "target") and metric not in HELDOUT_METRICS:
        raise MergeMixError(
            f"{where}.metric: unknown {'held-out' if source == 'heldout' else source}"
            f" metric {metric!r} "
            f"(expected one of {', '.join(HELDOUT_METRICS)})"
        )
    if not isinstance(metric, str) or not metric or "/" in metric:
        raise MergeMixError(f"{where}.metric: {metric!r} must be a non-empty name without '/'")


def _check_direction(where: str, direction: str) -> None:
    if direction not in DIRECTIONS:
        raise MergeMixError(
            f"{where}.direction: {direction!r} is not one of {', '.join(DIRECTIONS)}"
        )


def _match(keys: Sequence[str], source: str, metric: str, name: str) -> list[str]:
    """Metric keys `<source>/<name>/<metric>` that a (source, metric, name-or-'*') selects."""
    matched = []
    for key in keys:
        head, _, rest = key.partition("/")
        key_name, _, key_metric = rest.rpartition("/")
        if head == source and key_metric == metric and (name == "*" or key_name == name):
            matched.append(key)
    return matched


def _name_of(key: str) -> str:
    return key.partition("/")[2].rpartition("/")[0]


@dataclass(frozen=True)
class Term:
    """One weighted metric term of the objective."""

    source: str
    """Where the metric comes from: "heldout" (our per-domain evaluator), "target" (the
    same evaluator on a target set), "lmeval" or "calibrated"."""
    metric: str
    """Metric name: "loss", "ppl" or "bpb" for heldout; an lm-eval metric such as "acc"."""
    name: str = "*"
    """Domain (heldout) or task (lmeval) name, or "*" for all of them."""
    weight: float = 1.0
    """Non-negative weight of the term in the sum."""
    direction: str = "minimize"
    """"minimize" for losses, "maximize" for accuracies (the term is then negated)."""
    reduce: str = "mean"
    """How to combine the matched values: "mean", "max" or "min"."""

    def __post_init__(self) -> None:
        where = f"term {self.source}/{self.name}/{self.metric}"
        _check_source_metric(where, self.source, self.metric)
        _check_direction(where, self.direction)
        if self.reduce not in REDUCTIONS:
            raise MergeMixError(
                f"{where}.reduce: {self.reduce!r} is not one of {', '.join(REDUCTIONS)}"
            )
        if not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight):
            raise MergeMixError(f"{where}.weight: {self.weight!r} is not a finite number")
        if self.weight < 0:
            raise MergeMixError(
                f"{where}.weight: {self.weight} is negative; use direction: maximize instead"
            )

    @property
    def label(self) -> str:
        """How the term is named in `Evaluation.terms`, e.g. "max(heldout/*/loss)"."""
        return f"{self.reduce}({self.source}/{self.name}/{self.metric})"

    @property
    def sign(self) -> float:
        """+1 for minimize, -1 for maximize."""
        return 1.0 if self.direction == "minimize" else -1.0


@dataclass(frozen=True)
class Constraint:
    """Keep each matched metric within a relative tolerance of the baseline mixture's."""

    source: str
    """"heldout" or "lmeval", as for `Term`."""
    metric: str
    """Metric name, as for `Term`."""
    name: str = "*"
    """Domain or task name, or "*" for all of them."""
    exclude: tuple[str, ...] = ()
    """Names left out when `name` is "*" (e.g. the target domain)."""
    tolerance: float = DEFAULT_TOLERANCE
    """Allowed relative worsening against the baseline, e.g. 0.02 for 2%."""
    direction: str = "minimize"
    """Which way is better for the metric: "minimize" (losses) or "maximize"."""

    def __post_init__(self) -> None:
        where = f"constraint {self.source}/{self.name}/{self.metric}"
        _check_source_metric(where, self.source, self.metric)
        _check_direction(where, self.direction)
        if not isinstance(self.tolerance, (int, float)) or not 0 <= self.tolerance < 1:
            raise MergeMixError(f"{where}.tolerance: {self.tolerance!r} is not in [0, 1)")
        if self.exclude and self.name != "*":
            raise MergeMixError(f"{where}.exclude: only meaningful with name: '*'")

    def keys(self, available: Sequence[str]) -> list[str]:
        """The metric keys, among `available`, this constraint applies to."""
        matched = _match(available, self.source, self.metric, self.name)
        return [key for key in matched if _name_of(key) not in self.exclude]


@dataclass(frozen=True)
class Evaluation:
    """The objective of one mixture (floats) or of a batch of mixtures (arrays of shape (n,))."""

    value: Any
    """The scalar to minimise: the sum of the terms plus the penalty."""
    terms: dict[str, Any]
    """Each term's signed, weighted contribution, keyed by `Term.label`."""
    violations: dict[str, Any]
    """Relative excess over each constraint's tolerance (<= 0 means satisfied), by metric key."""
    penalty: Any
    """`Objective.penalty` times the summed positive violations."""
    feasible: Any
    """True when every constraint holds (always True without constraints)."""


@dataclass(frozen=True)
class Objective:
    """A weighted sum of metric terms to minimise, with optional baseline-relative constraints."""

    terms: tuple[Term, ...]
    """The terms summed into the objective."""
    constraints: tuple[Constraint, ...] = ()
    """Constraints relative to the `baseline` mixture's metrics."""
    baseline: str = "uniform"
    """The baseline mixture the constraints compare against: "uniform" or "natural"."""
    penalty: float = DEFAULT_PENALTY
    """Objective units added per unit of summed relative constraint violation."""
    name: str = "custom"
    """A label for reports: the preset name, or the YAML file's stem."""

    def __post_init__(self) -> None:
        if not self.terms:
            raise MergeMixError("objective.terms: at least one term is needed")
        if all(term.weight == 0 for term in self.terms):
            raise MergeMixError(
                "objective.terms: every term has weight 0, so every mixture would score 0;"
                " give at least one term a positive weight"
            )
        if self.baseline not in BASELINES:
            raise MergeMixError(
                f"objective.baseline: {self.baseline!r} is not one of {', '.join(BASELINES)}"
            )
        if not isinstance(self.penalty, (int, float)) or not self.penalty >= 0:
            raise MergeMixError(f"objective.penalty: {self.penalty!r} is not a number >= 0")

    def check_domains(self, domains: Sequence[str], targets: Sequence[str] | None = None) -> None:
        """Raise `MergeMixError` if a held-out term or constraint names a domain not in the
        pool, or (given the pool's `targets`) a target term names a target set it lacks."""
        for item in (*self.terms, *self.constraints):
            names = [item.name] + list(getattr(item, "exclude", ()))
            for name in names:
                if item.source == "heldout" and name != "*" and name not in domains:
                    raise MergeMixError(
                        f"objective: domain {name!r} is not in the pool "
                        f"(domains: {', '.join(domains)})"
                    )
                if (
                    item.source == "target"
                    and targets is not None
                    and name != "*"
                    and name not in targets
                ):
                    raise MergeMixError(
                        f"objective: target set {name!r} is not in the pool (target sets:"
                        f" {', '.join(targets) or 'none; add one with merge-mix pool add-target'})"
                    )

    def check_lmeval_metrics(self, available: Sequence[str]) -> None:
        """Raise `MergeMixError` if an lm-eval term or constraint matches none of the
        ``lmeval/<task>/<metric>`` keys the tasks declare (a metric or task name typo),
        before anything is scored."""
        for item in (*self.terms, *self.constraints):
            # A filtered metric ("acc,strict-match") is declared under its bare name.
            metric = item.metric.partition(",")[0]
            if item.source == "lmeval" and not _match(available, "lmeval", metric, item.name):
                have = sorted({k.rpartition("/")[2] for k in available if k.startswith("lmeval/")})
                tasks = sorted({_name_of(k) for k in available if k.startswith("lmeval/")})
                raise MergeMixError(
                    f"objective: lmeval/{item.name}/{item.metric}: no task declares that"
                    f" metric (metrics: {', '.join(have) or 'none'}; tasks: {', '.join(tasks)})"
                )

    @property
    def needs_lmeval(self) -> bool:
        """Whether any term or constraint reads lm-evaluation-harness metrics."""
        return any(item.source == "lmeval" for item in (*self.terms, *self.constraints))

    def required_metrics(self, domains: Sequence[str]) -> list[str]:
        """The metric keys the scorer must produce; lm-eval wildcards stay as `lmeval/*/<m>`."""
        keys: list[str] = []
        for item in (*self.terms, *self.constraints):
            if item.source == "heldout" and item.name == "*":
                names = [d for d in domains if d not in getattr(item, "exclude", ())]
            else:
                names = [item.name]
            for name in names:
                key = f"{item.source}/{name}/{item.metric}"
                if key not in keys:
                    keys.append(key)
        return keys

    def relevant_keys(self, available: Sequence[str]) -> list[str]:
        """The metric keys, among `available`, that some term or constraint reads."""
        keys: list[str] = []
        for term in self.terms:
            keys += _match(available, term.source, term.metric, term.name)
        for constraint in self.constraints:
            keys += constraint.keys(available)
        return list(dict.fromkeys(keys))

    def evaluate(
        self, metrics: Mapping[str, Any], baseline: Mapping[str, float] | None = None
    ) -> Evaluation:
        """Combine metrics into the objective.

        `metrics` maps metric keys to floats, or to arrays of shape (n,) to evaluate n mixtures
        at once. `baseline` holds the baseline mixture's metrics and is required when the
        objective has constraints.
        """
        available = list(metrics)
        contributions: dict[str, Any] = {}
        for term in self.terms:
            keys = _match(available, term.source, term.metric, term.name)
            if not keys:
                raise MergeMixError(
                    f"objective term {term.source}/{term.name}/{term.metric}: no such metric "
                    f"in the scorer's output (have: {', '.join(sorted(available)) or 'none'})"
                )
            stacked = np.stack([np.asarray(metrics[key], dtype=float) for key in keys])
            reduced = getattr(np, term.reduce)(stacked, axis=0)
            contributions[term.label] = term.weight * term.sign * reduced

        violations: dict[str, Any] = {}
        if self.constraints:
            if baseline is None:
                raise MergeMixError(
                    f"objective: constraints need the {self.baseline} baseline's metrics"
                )
            for constraint in self.constraints:
                keys = constraint.keys(available)
                if not keys:
                    raise MergeMixError(
                        f"objective constraint {constraint.source}/{constraint.name}/"
                        f"{constraint.metric}: no such metric in the scorer's output"
                    )
                for key in keys:
                    if key not in baseline:
                        raise MergeMixError(f"objective: baseline metrics lack {key!r}")
                    ratio = np.asarray(metrics[key], dtype=float) / float(baseline[key])
                    if constraint.direction == "minimize":
                        violations[key] = ratio - (1.0 + constraint.tolerance)
                    else:
                        violations[key] = (1.0 - constraint.tolerance) - ratio

        excess = sum((np.maximum(v, 0.0) for v in violations.values()), np.float64(0.0))
        penalty = self.penalty * excess
        value = sum(contributions.values()) + penalty
        feasible = np.broadcast_to(np.asarray(excess) <= 0.0, np.shape(value))
        if np.ndim(value) == 0:
            return Evaluation(
                value=float(value),
                terms={k: float(v) for k, v in contributions.items()},
                violations={k: float(v) for k, v in violations.items()},
                penalty=float(penalty),
                feasible=bool(feasible),
            )
        return Evaluation(value, contributions, violations, penalty, feasible)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that `objective_from_dict` turns back into this objective."""
        return {
            "name": self.name,
            "terms": [{k: getattr(t, k) for k in _TERM_KEYS} for t in self.terms],
            "constraints": [
                {**{k: getattr(c, k) for k in _CONSTRAINT_KEYS}, "exclude": list(c.exclude)}
                for c in self.constraints
            ],
            "baseline": self.baseline,
            "penalty": self.penalty,
        }


def _build(cls: type, where: str, raw: Any, allowed: tuple[str, ...]) -> Any:
    if not isinstance(raw, Mapping):
        raise MergeMixError(f"{where}: expected a mapping, got {type(raw).__name__}")
    unknown = [key for key in raw if key not in allowed]
    if unknown:
        raise MergeMixError(f"{where}: unknown key {unknown[0]!r} (expected: {', '.join(allowed)})")
    for required in ("source", "metric"):
        if required not in raw:
            raise MergeMixError(f"{where}: missing key {required!r}")
    values = dict(raw)
    if "exclude" in values:
        exclude = values["exclude"]
        values["exclude"] = (exclude,) if isinstance(exclude, str) else tuple(exclude or ())
    try:
        return cls(**values)
    except MergeMixError as err:
        raise MergeMixError(f"{where}: {err}") from None


def objective_from_dict(raw: Mapping[str, Any], where: str = "objective") -> Objective:
    """Build an `Objective` from a parsed YAML mapping; errors name the offending field."""
    if not isinstance(raw, Mapping):
        raise MergeMixError(f"{where}: expected a mapping with a 'terms' list")
    unknown = [key for key in raw if key not in _OBJECTIVE_KEYS]
    if unknown:
        raise MergeMixError(
            f"{where}: unknown key {unknown[0]!r} (expected: {', '.join(_OBJECTIVE_KEYS)})"
        )
    terms_raw = raw.get("terms")
    if not isinstance(terms_raw, list) or not terms_raw:
        raise MergeMixError(f"{where}.terms: expected a non-empty list of terms")
    constraints_raw = raw.get("constraints") or []
    if not isinstance(constraints_raw, list):
        raise MergeMixError(f"{where}.constraints: expected a list")
    terms = tuple(
        _build(Term, f"{where}.terms[{i}]", t, _TERM_KEYS) for i, t in enumerate(terms_raw)
    )
    constraints = tuple(
        _build(Constraint, f"{where}.constraints[{i}]", c, _CONSTRAINT_KEYS)
        for i, c in enumerate(constraints_raw)
    )
    try:
        return Objective(
            terms=terms,
            constraints=constraints,
            baseline=raw.get("baseline", "uniform"),
            penalty=raw.get("penalty", DEFAULT_PENALTY),
            name=str(raw.get("name", "custom")),
        )
    except MergeMixError as err:
        raise MergeMixError(f"{where}: {err}") from None


def preset(spec: str, calibrated: bool = False) -> Objective:
    """The objective named by a preset string: mean_loss, worst_loss, target:<domain>[:<tol>].

    With `calibrated`, the same objective over calibrated proxy losses (from `merge-mix
    validate`): the mean and worst presets read their own fitted aggregates."""
    if spec == "mean_loss":
        if calibrated:
            return Objective(terms=(Term("calibrated", "loss", "mean"),), name=f"{spec}@cal")
        return Objective(terms=(Term("heldout", "loss", "*", reduce="mean"),), name=spec)
    if spec == "worst_loss":
        if calibrated:
            return Objective(terms=(Term("calibrated", "loss", "worst"),), name=f"{spec}@cal")
        return Objective(terms=(Term("heldout", "loss", "*", reduce="max"),), name=spec)
    if spec.startswith("target:"):
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not parts[1]:
            raise MergeMixError(f"objective: {spec!r} should read target:<domain>[:<tolerance>]")
        tolerance = DEFAULT_TOLERANCE
        if len(parts) == 3:
            try:
                tolerance = float(parts[2])
            except ValueError:
                raise MergeMixError(
                    f"objective: tolerance {parts[2]!r} in {spec!r} is not a number"
                ) from None
        domain = parts[1]
        source = "calibrated" if calibrated else "heldout"
        # Calibrated aggregates share the per-domain key scheme; they are not domains.
        exclude = (domain, "mean", "worst") if calibrated else (domain,)
        return Objective(
            terms=(Term(source, "loss", domain),),
            constraints=(Constraint(source, "loss", "*", exclude, tolerance),),
            name=f"{spec}@cal" if calibrated else spec,
        )
    if spec.startswith("target-set:"):
        name = spec.partition(":")[2]
        if not name or "/" in name:
            raise MergeMixError(f"objective: {spec!r} should read target-set:<name>")
        if calibrated:
            raise MergeMixError(
                f"objective: {spec!r}: calibrated losses cover the domains, not target sets"
            )
        return Objective(terms=(Term("target", "loss", name),), name=spec)
    raise MergeMixError(
        f"objective: unknown preset {spec!r} (expected {', '.join(PRESETS)}, or a YAML file)"
    )


def load_objective(
    spec: str | Path | Mapping[str, Any],
    domains: Sequence[str] | None = None,
    calibrated: bool = False,
    targets: Sequence[str] | None = None,
) -> Objective:
    """Load an objective from a preset string, a YAML file path, or a parsed mapping.

    With `domains`, also check that every named held-out domain is in the pool (and with
    `targets`, every named target set). With `calibrated`, presets read calibrated losses
    (files say their own sources).
    """
    if isinstance(spec, Mapping):
        objective = objective_from_dict(spec)
    elif isinstance(spec, Path) or str(spec).endswith((".yaml", ".yml")):
        from merge_mix.config import load_yaml

        path = Path(spec)
        if not path.is_file():
            raise MergeMixError(f"objective: file {path} not found")
        raw = load_yaml(path)  # duplicate keys refused, like a pool spec's
        if isinstance(raw, Mapping) and "name" not in raw:
            raw = {**raw, "name": path.stem}
        objective = objective_from_dict(raw, where=str(path))
    else:
        objective = preset(str(spec), calibrated)
    if domains is not None:
        objective.check_domains(domains, targets)
    return objective
