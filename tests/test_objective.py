"""The objective: presets, YAML specs, evaluation with known answers, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

from merge_mix.errors import MergeMixError
from merge_mix.objective import Constraint, Objective, Term, load_objective

DOMAINS = ["web", "code", "math"]
METRICS = {
    "heldout/web/loss": 2.0,
    "heldout/code/loss": 1.0,
    "heldout/math/loss": 3.0,
    "heldout/web/ppl": 7.39,
    "lmeval/mmx_choice_code/acc": 0.6,
    "lmeval/mmx_choice_math/acc": 0.4,
}


def test_mean_and_worst_loss_presets():
    assert load_objective("mean_loss", DOMAINS).evaluate(METRICS).value == pytest.approx(2.0)
    assert load_objective("worst_loss", DOMAINS).evaluate(METRICS).value == pytest.approx(3.0)


def test_terms_are_weighted_signed_and_summed():
    objective = Objective(
        terms=(
            Term("heldout", "loss", "*", weight=1.0, reduce="min"),
            Term("lmeval", "acc", "*", weight=2.0, direction="maximize"),
        )
    )
    evaluation = objective.evaluate(METRICS)
    assert evaluation.value == pytest.approx(1.0 - 2.0 * 0.5)
    assert evaluation.feasible is True
    assert objective.needs_lmeval


def test_target_preset_is_feasible_within_tolerance_and_penalised_beyond():
    objective = load_objective("target:code", DOMAINS)
    baseline = {"heldout/web/loss": 2.0, "heldout/code/loss": 1.2, "heldout/math/loss": 3.0}
    inside = {**baseline, "heldout/code/loss": 1.0, "heldout/web/loss": 2.0 * 1.019}
    outside = {**baseline, "heldout/code/loss": 0.9, "heldout/web/loss": 2.0 * 1.05}

    ok = objective.evaluate(inside, baseline)
    assert ok.feasible and ok.value == pytest.approx(1.0)
    bad = objective.evaluate(outside, baseline)
    assert not bad.feasible
    # 3% over the 2% tolerance, times the default penalty of 100.
    assert bad.value == pytest.approx(0.9 + 100 * 0.03)
    assert set(bad.violations) == {"heldout/web/loss", "heldout/math/loss"}
    assert objective.required_metrics(DOMAINS) == [
        "heldout/code/loss",
        "heldout/web/loss",
        "heldout/math/loss",
    ]
    assert not objective.needs_lmeval


def test_target_tolerance_in_the_preset_string():
    objective = load_objective("target:math:0.05", DOMAINS)
    assert objective.constraints[0].tolerance == 0.05


def test_batched_evaluation_matches_one_at_a_time():
    objective = load_objective("target:code", DOMAINS)
    baseline = {f"heldout/{d}/loss": 2.0 for d in DOMAINS}
    rng = np.random.default_rng(0)
    batch = {f"heldout/{d}/loss": rng.uniform(1.8, 2.2, 50) for d in DOMAINS}
    values = objective.evaluate(batch, baseline).value
    for i in (0, 17, 49):
        single = {k: float(v[i]) for k, v in batch.items()}
        assert values[i] == pytest.approx(objective.evaluate(single, baseline).value)


def test_yaml_round_trip(tmp_path):
    path = tmp_path / "code_and_acc.yaml"
    path.write_text(
        "terms:\n"
        "  - {source: heldout, metric: bpb, name: '*'}\n"
        "  - {source: lmeval, metric: acc, name: mmx_choice_code, weight: 0.5,"
        " direction: maximize}\n"
        "constraints:\n"
        "  - {source: heldout, metric: loss, exclude: code, tolerance: 0.1}\n"
    )
    objective = load_objective(path, DOMAINS)
    assert objective.name == "code_and_acc"
    assert objective.constraints[0].exclude == ("code",)
    assert Objective(**_rebuild(objective)) == objective


def _rebuild(objective: Objective) -> dict:
    raw = objective.to_dict()
    return {
        "terms": tuple(Term(**t) for t in raw["terms"]),
        "constraints": tuple(
            Constraint(**{**c, "exclude": tuple(c["exclude"])}) for c in raw["constraints"]
        ),
        "baseline": raw["baseline"],
        "penalty": raw["penalty"],
        "name": raw["name"],
    }


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"terms": [{"source": "heldout", "metric": "loss", "colour": 1}]}, "unknown key 'colour'"),
        ({"terms": [{"source": "heldout", "metric": "perplexity"}]}, "unknown held-out metric"),
        ({"terms": [{"source": "web", "metric": "loss"}]}, ".source"),
        ({"terms": [{"source": "heldout", "metric": "loss", "direction": "down"}]}, ".direction"),
        ({"terms": [{"source": "heldout", "metric": "loss", "weight": -1}]}, "negative"),
        ({"terms": [{"source": "heldout", "metric": "loss", "reduce": "sum"}]}, ".reduce"),
        ({"terms": [{"source": "heldout", "metric": "loss", "name": "law"}]}, "'law' is not in"),
        ({"terms": []}, "terms"),
        ({"terms": [{"metric": "loss"}]}, "missing key 'source'"),
        ({"terms": [{"source": "heldout", "metric": "loss"}], "baseline": "x"}, "baseline"),
        ({"terms": [{"source": "heldout", "metric": "loss"}], "extra": 1}, "unknown key 'extra'"),
        ("target:", "target:<domain>"),
        ("target:law", "'law' is not in the pool"),
        ("best_loss", "unknown preset"),
    ],
)
def test_bad_specs_fail_with_one_line_naming_the_problem(spec, message):
    with pytest.raises(MergeMixError) as err:
        load_objective(spec, DOMAINS)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_metric_and_missing_baseline_are_named():
    with pytest.raises(MergeMixError, match="heldout/law/loss"):
        Objective(terms=(Term("heldout", "loss", "law"),)).evaluate(METRICS)
    with pytest.raises(MergeMixError, match="uniform baseline"):
        load_objective("target:code", DOMAINS).evaluate(METRICS)


def test_missing_yaml_file_and_bad_yaml(tmp_path):
    with pytest.raises(MergeMixError, match="not found"):
        load_objective(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("terms: [\n")
    with pytest.raises(MergeMixError, match="not valid YAML"):
        load_objective(bad)
