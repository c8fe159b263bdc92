"""Validation end to end on the tiny pool: references trained, killed and resumed, reused by a
later validation; outputs; the test split, paired intervals and the seed-noise floor; the
calibration round trip and its split/budget checks; drift; bad input as one-line errors.

The fidelity metrics themselves are tested in test_fidelity.py."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
import yaml

from merge_mix.errors import MergeMixError
from merge_mix.validate import drift_warning, format_summary, load_calibration, validate
from merge_mix.validate.calibration import Calibration
from merge_mix.validate.drift import component_drift

# The tiny pool's components see 40k tokens; references here see a quarter of that (20 steps
# of 512 tokens, checkpoints every 10), recorded as a different budget.
REF_TOKENS = 10_000
# The budget the pool recorded its components' held-out losses with (training.eval_tokens).
HELDOUT = 4096
COMMON = dict(
    n_references=6,
    reference_tokens=REF_TOKENS,
    heldout_tokens=HELDOUT,
    n_boot=200,
    device="cpu",
    show_progress=False,
)
LABELS = ["uniform", "natural", "pure:code", "pure:c", "pure:prose", "dirichlet:6"]


def _weights_mtimes(pool):
    return {
        p.name: (p / "model.safetensors").stat().st_mtime_ns
        for p in (pool / "references").iterdir()
        if (p / "reference.json").is_file()
    }


@pytest.fixture(scope="module")
def validated(tmp_path_factory, tiny_pool):
    """A copy of the tiny pool validated once with a kill in the middle of the second
    reference (after its step-10 checkpoint), then again to completion."""
    pool = tmp_path_factory.mktemp("validate") / "pool"
    shutil.copytree(tiny_pool, pool)

    def kill(label, step):
        if label == "natural" and step == 15:
            raise RuntimeError("simulated kill")

    with pytest.raises(RuntimeError, match="simulated kill"):
        validate(pool, step_callback=kill, **COMMON)
    before = _weights_mtimes(pool)
    result = validate(pool, **COMMON)
    return pool, before, result


def test_killed_validation_resumes_without_retraining(validated):
    pool, before, result = validated
    by_label = {m["label"]: m for m in result["mixtures"]}
    assert list(by_label) == LABELS
    assert list(before) == [by_label["uniform"]["reference"]]
    assert by_label["uniform"]["status"] == "reused"
    assert by_label["natural"]["status"] == "resumed"
    assert by_label["natural"]["resumed_from_step"] == 10
    assert {m["status"] for m in result["mixtures"][2:]} == {"trained"}
    # Five of the mixtures' references and the uniform mixture's second seed.
    assert result["costs"]["references_trained"] == 6
    [extra] = result["seed_references"]
    assert (extra["mixture"], extra["seed"], extra["status"]) == ("uniform", 1, "trained")
    assert extra["seed_0_reference"] == by_label["uniform"]["reference"] != extra["reference"]
    after = _weights_mtimes(pool)
    assert {k: after[k] for k in before} == before  # the finished reference was not rewritten
    assert len(after) == 7
    assert not list((pool / "work").glob("ref-*/"))  # checkpoints cleaned up once committed
    record = json.loads((pool / "references" / after.popitem()[0] / "reference.json").read_text())
    assert record["tokens"] == REF_TOKENS and record["component_tokens"] == 40_000
    seeds = {}
    for ref in (by_label["uniform"]["reference"], extra["reference"]):
        record = json.loads((pool / "references" / ref / "reference.json").read_text())
        seeds[record["training_seed"]] = record["seed"]
    assert seeds == {0: 999, 1: 1999}  # seed 0 keeps the data seed references always had


def test_outputs_have_finite_numbers_and_bounded_correlations(validated):
    pool, _, result = validated
    out = pool / "validation"
    for name in ("validation.json", "references.csv", "calibration.json", "report.md"):
        assert (out / name).is_file(), name
    assert json.loads((out / "validation.json").read_text())["targets"] == result["targets"]
    # Judged on test, calibration fitted on search: recorded in both files.
    assert result["splits"]["judged_on"] == "test"
    assert result["splits"]["calibration_fitted_on"] == "search"
    assert result["splits"]["search"]["heldout_tokens"] == HELDOUT
    assert result["seed_floor"]["split"] == "test"
    calibration = json.loads((out / "calibration.json").read_text())
    assert (calibration["split"], calibration["heldout_tokens"]) == ("search", HELDOUT)
    assert calibration["loo_judged_on"] == "test"
    for m in result["mixtures"]:
        values = [*m["proxy"].values(), *m["real"].values(), *m["calibrated_loo"].values()]
        assert all(math.isfinite(v) for v in values), m["label"]
    for side in ("raw", "calibrated"):
        table = result["fidelity"][side]
        assert table["baselines"] == {"uniform": "uniform", "natural": "natural"}
        for t in result["targets"]:
            for key in ("spearman", "kendall", "pearson"):
                c = table["targets"][t][key]
                assert -1 <= c["value"] <= 1, (side, t, key)
                assert c["low"] <= c["value"] + 1e-12 and c["value"] <= c["high"] + 1e-12
        assert -1 <= table["macro"]["spearman"]["value"] <= 1
    with (out / "references.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["label"] for r in rows] == LABELS
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(result["targets"]) + 1
    markdown = (out / "report.md").read_text()
    assert "## Where fidelity is weak" in markdown and "Spearman [95% CI]" in markdown
    # A reduced reference budget is said out loud, and never installed as the pool's calibration.
    assert any("not the components' 40,000" in w for w in result["warnings"])
    assert result["calibration"]["installed"] is None
    assert not (pool / "calibration.json").exists()
    summary = format_summary(result)
    assert "raw proxies" in summary and "calibrated proxies (leave-one-out)" in summary
    assert "mean loss" in summary and "report.html" in summary
    assert "judged on the test split" in summary and "fitted on the search split" in summary
    assert "seed-noise floor on the test split, from uniform (extra seed)" in summary
    assert "## Seed-noise floor" in markdown and "uniform: seed 1 - seed 0" in markdown


def test_proxies_and_references_are_scored_by_the_same_evaluator(validated):
    pool, _, result = validated
    manifest = json.loads((pool / "manifest.json").read_text())
    pure = next(m for m in result["mixtures"] if m["label"] == "pure:code")
    # A one-hot merge is the component, scored on the windows the pool recorded it with.
    for d, losses in manifest["components"]["code"]["heldout"].items():
        assert pure["proxy_search"][f"heldout/{d}/loss"] == pytest.approx(losses["loss"], abs=2e-6)
    # The pure reference trains on the component's own data mixture.
    expected = manifest["components"]["code"]["training_mixture"]
    assert pure["effective_mixture"] == pytest.approx(expected, abs=1e-6)
    for m in result["mixtures"]:
        record = json.loads((pool / "references" / m["reference"] / "reference.json").read_text())
        assert record["heldout_tokens"] == HELDOUT
        for key, value in record["heldout"].items():
            assert m["real_search"][key] == pytest.approx(value, abs=2e-6), (m["label"], key)
        # A complete HF model directory, tokenizer included, like base and components.
        assert (pool / "references" / m["reference"] / "tokenizer.json").is_file()
    # The fidelity figures come from every piece of the test split: recompute one directly.
    from merge_mix.evaluate import HeldoutSet, document_scores, metrics_from_documents
    from merge_mix.model import load_model
    from merge_mix.pool import Pool

    p = Pool.open(pool)
    test = HeldoutSet.from_pool_data(p.data_dir, p.domains, p.bos_id, p.seq_len, None, "test")
    ref = result["mixtures"][-1]
    model = load_model(pool / "references" / ref["reference"], "cpu")
    direct = metrics_from_documents(document_scores(model, test, "cpu", "fp32"))
    for key, value in direct.items():
        assert ref["real"][key] == pytest.approx(value, rel=1e-9), key
        assert ref["real"][key] != ref["real_search"][key], key  # other documents
    assert result["splits"]["test"]["documents"] == test.documents()
    drift = result["drift"]["components"]
    assert set(drift) == {"code", "c", "prose"} and all(0 < x < 1 for x in drift.values())
    assert result["drift"]["max"] == max(drift.values())


def test_later_validation_reuses_references_from_a_mixtures_file(validated, tmp_path):
    pool, _, first = validated
    by_label = {m["label"]: m for m in first["mixtures"]}
    entries = [
        {"label": label, "weights": by_label[label]["merge_weights"]}
        for label in ("uniform", "pure:code", "pure:c", "dirichlet:6")
    ]
    # The natural mixture given as its effective data mixture instead of merge weights.
    entries.append({"label": "nat", "mixture": by_label["natural"]["effective_mixture"]})
    path = tmp_path / "mixtures.yaml"
    path.write_text(yaml.safe_dump({"mixtures": entries}))
    before = _weights_mtimes(pool)
    result = validate(pool, mixtures=path, out_dir=tmp_path / "out", **COMMON)
    assert [m["status"] for m in result["mixtures"]] == ["reused"] * 5
    assert [m["status"] for m in result["seed_references"]] == ["reused"]
    assert result["costs"]["references_trained"] == 0
    assert _weights_mtimes(pool) == before
    assert result["mixtures"][4]["reference"] == by_label["natural"]["reference"]
    assert result["fidelity"]["raw"]["baselines"] == {"uniform": "uniform", "natural": "nat"}
    assert (tmp_path / "out" / "report.html").is_file()


def test_calibration_round_trips_and_feeds_the_proxy_scorer(validated):
    from merge_mix.proxy import ProxyScorer

    pool, _, result = validated
    path = pool / "validation" / "calibration.json"
    record = json.loads(path.read_text())
    assert Calibration.from_dict(record["calibration"]).to_dict() == record["calibration"]
    calibration = load_calibration(pool, path=path, keep_base=())
    assert calibration.heldout_tokens == HELDOUT
    fit = Calibration.from_dict(result["calibration"]["fit"])
    scorer = ProxyScorer(pool, device="cpu", heldout_tokens=HELDOUT, calibration=calibration)
    w = np.full(3, 1 / 3)
    metrics = scorer.score(w)
    calibrated = {k: v for k, v in metrics.items() if k.startswith("calibrated/")}
    assert set(calibrated) == {
        "calibrated/code/loss",
        "calibrated/c/loss",
        "calibrated/prose/loss",
        "calibrated/mean/loss",
        "calibrated/worst/loss",
    }
    assert all(math.isfinite(v) for v in calibrated.values())
    mean = np.mean([metrics[f"heldout/{d}/loss"] for d in ("code", "c", "prose")])
    gap = fit.predict_gap(w[None, :], "mean_loss")[0]
    assert calibrated["calibrated/mean/loss"] == pytest.approx(mean - gap, abs=1e-12)
    with pytest.raises(MergeMixError, match="not on the simplex"):
        calibration.apply(np.array([0.7, 0.7, -0.4]), metrics)
    with pytest.raises(MergeMixError, match="no calibration; run `merge-mix validate"):
        load_calibration(pool)  # a reduced-budget calibration is not installed in the pool
    with pytest.raises(MergeMixError, match="keep_base"):
        load_calibration(pool, path=path, keep_base=("*embed_tokens*",))
    stale = dict(record, components_sha256={**record["components_sha256"], "c": "0" * 64})
    (pool / "stale.json").write_text(json.dumps(stale))
    with pytest.raises(MergeMixError, match="component 'c' changed"):
        load_calibration(pool, path=pool / "stale.json")
    # Never applied to a cheaper (successive-halving) rung: the gaps were fitted at full budget.
    assert not any(k.startswith("calibrated/") for k in scorer.score(w, HELDOUT // 4))
    assert scorer.score(w, HELDOUT)["calibrated/mean/loss"] == calibrated["calibrated/mean/loss"]
    # A scorer on another budget or split is refused, in one line.
    for kwargs, expected in (
        (
            dict(heldout_tokens=2 * HELDOUT),
            "at 4,096 tokens per domain, not the search split at 8,192",
        ),
        (
            dict(heldout_tokens=HELDOUT, split="test"),
            "fitted on the search split at 4,096 tokens per domain, not the test split",
        ),
    ):
        with pytest.raises(MergeMixError) as err:
            ProxyScorer(pool, device="cpu", calibration=calibration, **kwargs)
        assert expected in str(err.value) and "\n" not in str(err.value)
    # So an objective over calibrated losses cannot search with successive halving.
    from merge_mix.objective import load_objective
    from merge_mix.search.config import SearchConfig
    from merge_mix.search.pipeline import search_pool

    config = SearchConfig(n_trials=4, halving=True, budget_tokens=HELDOUT, progress=False)
    objective = load_objective("mean_loss", ["code", "c", "prose"], calibrated=True)
    with pytest.raises(MergeMixError, match="calibrated losses exist at the full budget only"):
        search_pool(pool, objective, config, pool / "nowhere", None, {"calibration": calibration})
    assert not (pool / "nowhere").exists()
    (pool / "unsplit.json").write_text(
        json.dumps({k: v for k, v in record.items() if k != "split"})
    )
    with pytest.raises(MergeMixError, match="fitted on no recorded split"):
        ProxyScorer(
            pool,
            device="cpu",
            heldout_tokens=HELDOUT,
            calibration=load_calibration(pool, path=pool / "unsplit.json"),
        )


def test_intervals_and_seed_floor_are_paired_over_test_documents(validated):
    """Every regret and gain has a paired interval around its value; the floor is the
    largest seed difference, which is the seed-1 reference minus the seed-0 one."""
    _, _, result = validated
    by_label = {m["label"]: m for m in result["mixtures"]}
    [extra] = result["seed_references"]
    floor = result["seed_floor"]["targets"]
    assert set(floor) == set(result["targets"])
    for t in ("heldout/code/loss", "heldout/c/loss", "heldout/prose/loss"):
        [evidence] = floor[t]["evidence"]  # no component evidence at a reduced budget
        assert (evidence["kind"], evidence["mixture"], evidence["seeds"]) == (
            "seed",
            "uniform",
            [1, 0],
        )
        expected = extra["real"][t] - by_label["uniform"]["real"][t]
        assert evidence["value"] == pytest.approx(expected, abs=1e-12)
        assert floor[t]["floor"] == pytest.approx(abs(expected), abs=1e-12)
        assert evidence["low"] <= evidence["value"] <= evidence["high"]
    mean = np.mean([extra["real"][f"heldout/{d}/loss"] for d in ("code", "c", "prose")])
    assert floor["mean_loss"]["floor"] == pytest.approx(
        abs(mean - by_label["uniform"]["real"]["mean_loss"])
    )
    for side in ("raw", "calibrated"):
        for t in result["targets"]:
            e = result["fidelity"][side]["targets"][t]
            assert e["seed_floor"] == floor[t]["floor"]
            r = e["regret"]
            assert r["interval"]["value"] == pytest.approx(r["absolute"], abs=1e-12)
            assert r["interval"]["low"] <= r["interval"]["value"] <= r["interval"]["high"]
            if r["pick"] == r["best"]:
                assert r["below_seed_floor"] is None and r["absolute"] == 0.0
            else:
                assert r["below_seed_floor"] is (r["absolute"] < e["seed_floor"])
            for name, g in e["baselines"].items():
                assert g["interval"]["value"] == pytest.approx(g["gain"], abs=1e-12), (t, name)
                assert g["interval"]["low"] <= g["gain"] <= g["interval"]["high"]
                if g["mixture"] == r["pick"]:
                    assert g["below_seed_floor"] is None and g["gain"] == 0.0
                else:
                    assert g["below_seed_floor"] is (abs(g["gain"]) < e["seed_floor"])
    for m in result["mixtures"]:
        gap = m["proxy_minus_real"]["mean_loss"]
        assert gap["value"] == pytest.approx(m["proxy"]["mean_loss"] - m["real"]["mean_loss"])
        assert gap["low"] <= gap["value"] <= gap["high"]


def test_a_planted_gain_below_the_seed_floor_is_said_so():
    """Synthetic document scores with known losses: two seeds of uniform 0.05 nats apart, a
    pick 0.01 better than uniform (below the floor), 0.51 better than natural (above it)."""
    from merge_mix.evaluate import DocumentScores
    from merge_mix.validate.intervals import measure_intervals, target_values
    from merge_mix.validate.metrics import fidelity_table
    from merge_mix.validate.summary import below_floor_points

    rng = np.random.default_rng(0)
    tokens = rng.integers(50, 200, size=40).astype(float)
    noise = rng.normal(0, 0.02, size=40)

    def model(loss):
        return {"a": DocumentScores(tokens * (loss + noise), tokens, 4 * tokens)}

    losses = {"uniform": 2.0, "natural": 2.5, "pick": 1.99}
    labels = list(losses)
    scores = {f"real:{i}": model(v) for i, v in enumerate(losses.values())}
    scores.update({f"proxy:{i}": model(v + 0.3) for i, v in enumerate(losses.values())})
    scores["seed:0"] = model(2.05)
    real = {"heldout/a/loss": np.array(list(losses.values()))}
    table = fidelity_table(real, real, labels, baselines={"uniform": 0, "natural": 1}, n_boot=50)
    out = measure_intervals(
        {"raw": table},
        ["heldout/a/loss"],
        labels,
        scores,
        target_values(["heldout/a/loss"], ["a"]),
        {},
        {},
        [(0, "seed:0", 1)],
        [],
        n_boot=200,
    )
    e = table["targets"]["heldout/a/loss"]
    assert out["floor"]["targets"]["heldout/a/loss"]["floor"] == pytest.approx(0.05)
    assert e["regret"]["pick"] == "pick" and e["regret"]["below_seed_floor"] is None
    uniform, natural = e["baselines"]["uniform"], e["baselines"]["natural"]
    assert uniform["gain"] == pytest.approx(0.01) and uniform["below_seed_floor"] is True
    assert natural["gain"] == pytest.approx(0.51) and natural["below_seed_floor"] is False
    # Common document noise cancels in a paired comparison: 0.01 is resolved all the same.
    assert uniform["interval"]["verdict"] == "better"
    assert uniform["interval"]["low"] == pytest.approx(0.01) == uniform["interval"]["high"]
    assert out["gaps"][2]["heldout/a/loss"]["value"] == pytest.approx(0.3)
    result = {"targets": ["heldout/a/loss"], "fidelity": {"raw": table}}
    assert below_floor_points(result) == [
        "a: the gain over uniform of the proxy's pick (pick) is below the seed-noise floor"
        " (0.0500): retraining with another seed could change it."
    ]


def test_pure_references_at_the_component_budget_are_floor_evidence(validated):
    """A pure-mixture reference counts as a second seed of its component only when it was
    trained by the component's recipe: the components' budget, nothing kept at the base."""
    from merge_mix.pool import Pool
    from merge_mix.validate.intervals import component_evidence, seeded_mixtures

    pool = Pool.open(validated[0])
    plans = []
    for m in validated[2]["mixtures"]:
        w = np.array([m["merge_weights"][d] for d in pool.domains])
        mix = np.array([m["effective_mixture"][d] for d in pool.domains])
        plans.append(type("Plan", (), {"label": m["label"], "merge_weights": w, "mixture": mix}))
    full = 40_000
    assert component_evidence(pool, plans, full, full, ()) == [
        (2, "code"),
        (3, "c"),
        (4, "prose"),
    ]
    assert component_evidence(pool, plans, REF_TOKENS, full, ()) == []
    assert component_evidence(pool, plans, full, full, ("*embed*",)) == []
    baselines = {"uniform": 0, "natural": 1}
    assert seeded_mixtures(None, 2, plans, baselines) == ([0], [])
    assert seeded_mixtures(["natural", "pure:c", "natural"], 3, plans, baselines) == ([1, 3], [])
    assert seeded_mixtures(None, 1, plans, baselines) == ([], [])
    indices, warnings = seeded_mixtures(None, 2, plans[1:], {})
    assert indices == [] and warnings[0].startswith("warning: no uniform mixture")


def test_unknown_seed_mixture_is_a_one_line_error(validated):
    with pytest.raises(MergeMixError) as err:
        validate(validated[0], seed_mixtures=["uniform", "nope"], **COMMON)
    assert "seed_mixtures: 'nope' is not a mixture of this validation" in str(err.value)
    assert "\n" not in str(err.value)


def test_drift_warning_against_validated_regimes(validated, tmp_path, tiny_pool):
    pool, _, result = validated
    base = tiny_pool / "base"
    assert component_drift(base, base) == 0.0
    drift = result["drift"]["max"]
    assert drift_warning(pool) is None  # no installed calibration, nothing to compare with
    regimes = {}
    for name, at, holds in (("near", drift / 2, True), ("far", drift * 2, True), ("bad", 1, False)):
        regimes[name] = tmp_path / f"{name}.json"
        regimes[name].write_text(json.dumps({"drift": {"max": at}, "fidelity": {"holds": holds}}))
    assert "beyond" in drift_warning(pool, validated=[regimes["near"]])
    assert drift_warning(pool, validated=[regimes["near"], regimes["far"]]) is None
    assert "none of the given validations" in drift_warning(pool, validated=[regimes["bad"]])


def _write(path, content):
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


EVEN = {"code": 1 / 3, "c": 1 / 3, "prose": 1 / 3}


@pytest.mark.parametrize(
    "content, expected",
    [
        ([{"weights": {"code": 0.5, "web": 0.5}}] * 4, "mixtures[0].weights.web: not a domain"),
        ("- weights: {code: 0.5\n- [", "not valid JSON or YAML"),
        (None, "cannot read mixtures file"),
        ([{"weights": {"code": 1.0}}, {"weights": {"c": 1.0}}, {"weights": EVEN}], "at least 4"),
        ([{"weights": {"code": 0.5, "c": 0.2}}] * 4, "sum to 0.7, not 1"),
        ([{"weights": {"code": 1.5, "c": -0.5}}] * 4, "c is negative"),
        ([{"mixture": {"code": 1.0}}] * 4, "mixtures[0].mixture: c=0 is below"),
        ([{"weights": EVEN, "mixture": EVEN}] * 4, "exactly one of 'weights' and 'mixture'"),
        ({"mixes": []}, "expected a list"),
    ],
)
def test_bad_mixtures_file_is_a_one_line_error(validated, tmp_path, content, expected):
    pool = validated[0]
    path = tmp_path / "mixtures.yaml"
    if content is not None:
        _write(path, content)
    with pytest.raises(MergeMixError) as err:
        validate(pool, mixtures=path, **COMMON)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_bad_arguments_are_one_line_errors(validated, tmp_path):
    pool = validated[0]
    with pytest.raises(MergeMixError, match="too few"):
        validate(pool, **{**COMMON, "n_references": 3})
    with pytest.raises(MergeMixError, match="not on the simplex|simplex"):
        validate(pool, mixtures=[(str(i), np.array([0.5, 0.2, 0.2])) for i in range(4)], **COMMON)
    (tmp_path / "p").mkdir()
    with pytest.raises(MergeMixError, match="incomplete"):
        validate(tmp_path / "p", **COMMON)
    with pytest.raises(MergeMixError, match="search run directory not found"):
        validate(pool, run_dir=tmp_path / "nowhere", **COMMON)


def test_search_picks_come_first_then_the_default_set(tmp_path):
    from merge_mix.validate.mixtures import default_mixtures, search_picks

    domains = ["code", "c", "prose"]
    best = {"domains": domains, "merge_weights": {"code": 0.6, "c": 0.3, "prose": 0.1}}
    (tmp_path / "best.json").write_text(json.dumps(best))
    rows = [
        {"number": 0, "kind": "baseline:uniform", "objective": 1.0, "merge_weights": EVEN},
        {"number": 1, "kind": "sampler:tpe", "objective": 3.0, "merge_weights": EVEN},
        {
            "number": 2,
            "kind": "sampler:tpe",
            "objective": 2.0,
            "merge_weights": best["merge_weights"],
        },
        {
            "number": 3,
            "kind": "sampler:tpe",
            "objective": 2.5,
            "feasible": False,
            "merge_weights": EVEN,
        },
        {
            "number": 4,
            "kind": "halving:rung0",
            "objective": 0.1,
            "full_budget": False,
            "merge_weights": EVEN,
        },
        {
            "number": 5,
            "kind": "sampler:tpe",
            "objective": 2.2,
            "merge_weights": {"code": 0.2, "c": 0.2, "prose": 0.6},
        },
    ]
    (tmp_path / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    picks = search_picks(tmp_path, domains, top=3)
    assert [label for label, _ in picks] == ["search:best", "search:#5", "search:#1"]
    assert picks[0][1] == pytest.approx([0.6, 0.3, 0.1])
    mixtures = default_mixtures(domains, np.array([0.2, 0.3, 0.5]), 9, seed=1, picks=picks)
    labels = [label for label, _ in mixtures]
    # search:#1 is the uniform mixture, so the uniform baseline is not repeated.
    assert labels[:7] == [
        "search:best",
        "search:#5",
        "search:#1",
        "natural",
        "pure:code",
        "pure:c",
        "pure:prose",
    ]
    assert len(labels) == 9 and labels[7].startswith("dirichlet:")
    keys = {tuple(np.round(w, 6)) for _, w in mixtures}
    assert len(keys) == 9 and all(abs(w.sum() - 1) < 1e-9 for _, w in mixtures)
    again = default_mixtures(domains, np.array([0.2, 0.3, 0.5]), 9, seed=1, picks=picks)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(mixtures, again, strict=True))


def test_a_reference_locked_by_another_process_is_left_to_it(validated):
    from merge_mix.artifacts import file_lock
    from merge_mix.pool import Pool
    from merge_mix.validate.references import (
        ReferencePlan,
        ensure_reference,
        reference_id,
        training_spec,
    )

    pool_dir, _, result = validated
    pool = Pool.open(pool_dir)
    spec = training_spec(pool)
    done = result["mixtures"][0]
    mixture = np.array([0.5, 0.25, 0.25])
    fresh = ReferencePlan(
        reference_id(pool, mixture, REF_TOKENS), "x", np.zeros(3), mixture, REF_TOKENS
    )
    args = dict(spec=spec, device="cpu", heldout=None, precision="fp32", show_progress=False)
    with file_lock(pool_dir / "work" / f"ref-{fresh.id}.lock"):
        assert ensure_reference(pool, fresh, **args) == (None, "busy")
    with file_lock(pool_dir / "work" / f"ref-{done['reference']}.lock"):
        plan = ReferencePlan(done["reference"], "uniform", np.full(3, 1 / 3), mixture, REF_TOKENS)
        record, status = ensure_reference(pool, plan, **args)  # a committed record needs no lock
    assert status == "reused" and record["id"] == done["reference"]


def test_an_installed_calibration_decides_the_drift_warning(validated, tmp_path):
    pool, _, result = validated
    shutil.copy(pool / "validation" / "calibration.json", pool / "calibration.json")
    try:
        warning = drift_warning(pool)
        if result["verdict"]["holds"]:
            assert warning is None
        else:
            assert warning.startswith("warning: validation of") and "out of sample" in warning
        assert load_calibration(pool).path == pool / "calibration.json"
    finally:
        (pool / "calibration.json").unlink()


def test_fidelity_on_lm_eval_benchmarks_and_an_objective(validated, tmp_path):
    """With --tasks and --objective, proxies and references are scored on the same lm-eval
    tasks; each benchmark metric gets its own fidelity row, ranked in its own direction, and
    the objective is computed from each side's metrics (references reused, none trained)."""
    from merge_mix.lmeval import evaluate_tasks, make_tasks
    from merge_mix.model import load_model
    from merge_mix.objective import load_objective
    from merge_mix.tokens import load_tokenizer

    pool = validated[0]
    tasks = tmp_path / "tasks"
    make_tasks(pool, tasks, max_docs_per_domain=8, n_choices=4, seed=0)
    objective = _write(
        tmp_path / "objective.yaml",
        {
            "terms": [
                {"source": "heldout", "metric": "loss", "name": "*"},
                {"source": "lmeval", "metric": "acc", "name": "*", "direction": "maximize"},
            ],
            "constraints": [{"source": "heldout", "metric": "loss", "name": "c", "tolerance": 0.5}],
        },
    )
    before = _weights_mtimes(pool)
    result = validate(
        pool,
        out_dir=tmp_path / "out",
        lmeval_tasks=["mm_tiny"],
        lmeval_include=tasks,
        lmeval_limit=8,
        objective=objective,
        **COMMON,
    )
    assert [m["status"] for m in result["mixtures"]] == ["reused"] * 6
    assert _weights_mtimes(pool) == before
    bench = result["benchmark_targets"]
    expected = {
        f"lmeval/mm_tiny_{d}_{k}/{m}"
        for d in ("code", "c", "prose")
        for k, metrics in (
            ("ppl", ("word_perplexity", "byte_perplexity", "bits_per_byte")),
            ("choice", ("acc", "acc_norm")),
        )
        for m in metrics
    }
    assert set(bench) == expected
    table = result["fidelity"]["benchmarks"]
    assert table["macro"]["targets"] == bench
    labels = [m["label"] for m in result["mixtures"]]
    for t in bench:
        entry = table["targets"][t]
        higher = t.endswith(("/acc", "/acc_norm"))
        assert entry["higher_is_better"] is higher, t
        proxy = np.array([m["proxy"][t] for m in result["mixtures"]])
        # Proportions get their binomial resolution on the items scored (--limit 8).
        res = entry["resolution"]
        if higher:
            real = np.array([m["real"][t] for m in result["mixtures"]])
            p = real.mean()
            assert res["items"] == 8
            assert res["standard_error"] == pytest.approx(math.sqrt(p * (1 - p) / 8))
            assert res["real_spread"] == pytest.approx(real.max() - real.min())
            assert res["resolved"] is (res["real_spread"] >= 4 * res["standard_error"])
        else:
            assert res is None
        # The proxy's pick is the best proxy score in the metric's own direction.
        assert (
            entry["regret"]["pick"] == labels[int(np.argmax(proxy) if higher else np.argmin(proxy))]
        )

    # References were scored on the same tasks: recompute one independently.
    ref = next(m for m in result["mixtures"] if m["label"] == "dirichlet:6")
    tokenizer = load_tokenizer(pool / "tokenizer")
    model = load_model(pool / "references" / ref["reference"], "cpu")
    direct = evaluate_tasks(model, tokenizer, ["mm_tiny"], include_path=tasks, limit=8)
    for t in bench:
        assert ref["real"][t] == pytest.approx(direct[t], rel=1e-6), t
    # A one-hot proxy is the component itself.
    pure = next(m for m in result["mixtures"] if m["label"] == "pure:prose")
    component = load_model(pool / "components" / "prose", "cpu")
    direct = evaluate_tasks(component, tokenizer, ["mm_tiny"], include_path=tasks, limit=8)
    for t in bench:
        assert pure["proxy"][t] == pytest.approx(direct[t], rel=1e-5), t

    # The objective target is the objective evaluated on each side's own metrics, its
    # constraint measured against that side's uniform mixture.
    obj = load_objective(objective)
    uniform = next(m for m in result["mixtures"] if m["label"] == "uniform")
    for m in result["mixtures"]:
        for side in ("proxy", "real"):
            value = obj.evaluate(m[side], uniform[side]).value
            assert m[side]["objective"] == pytest.approx(value, abs=1e-9), (m["label"], side)
    assert "objective" in result["targets"] and result["objective"]["name"] == "objective"
    for side in ("raw", "calibrated"):
        assert -1 <= result["fidelity"][side]["targets"]["objective"]["spearman"]["value"] <= 1
    calibrated = [m["calibrated_loo"]["calibrated/objective"] for m in result["mixtures"]]
    assert calibrated != [m["proxy"]["objective"] for m in result["mixtures"]]

    out = tmp_path / "out"
    assert (out / "scatter_benchmarks.png").is_file()
    markdown = (out / "report.md").read_text()
    assert "## Fidelity on lm-eval benchmarks (raw proxies)" in markdown
    assert "macro (benchmarks)" in markdown and "mm_tiny_code_choice/acc" in markdown
    with (out / "references.csv").open() as fh:
        row = next(csv.DictReader(fh))
    assert "real/lmeval/mm_tiny_c_choice/acc" in row and "proxy/objective" in row
    summary = format_summary(result)
    assert "lm-eval benchmarks (raw proxies)" in summary and "objective:" in summary
    unresolved = [
        t for t in bench if (table["targets"][t]["resolution"] or {}).get("resolved") is False
    ]
    assert all(
        f"{t.removeprefix('lmeval/')}: the references' real scores span" in summary
        for t in unresolved
    )


def test_bad_tasks_or_objective_fail_before_any_training(validated, tmp_path):
    from click.testing import CliRunner

    from merge_mix.cli import main

    pool = validated[0]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    runner = CliRunner()
    for args, expected in (
        (["--tasks", "mm_nope", "--include-path", str(tasks)], "lm-eval task 'mm_nope' not found"),
        (["--objective", "target:web"], "domain 'web' is not in the pool"),
    ):
        before = sorted((pool / "references").iterdir())
        res = runner.invoke(main, ["validate", str(pool), "-n", "8", "--quiet", *args])
        assert res.exit_code != 0
        message = res.output.strip()
        assert expected in message and "\n" not in message and "Traceback" not in message
        assert sorted((pool / "references").iterdir()) == before
    with pytest.raises(MergeMixError, match="uses lm-eval metrics; name the tasks"):
        objective = {"terms": [{"source": "lmeval", "metric": "acc", "direction": "maximize"}]}
        validate(pool, objective=objective, **COMMON)


def test_a_search_run_lends_its_objective(validated, tmp_path):
    from merge_mix.objective import load_objective

    pool = validated[0]
    run = tmp_path / "run"
    run.mkdir()
    domains = ["code", "c", "prose"]
    best = {"domains": domains, "merge_weights": {"code": 1.0, "c": 0.0, "prose": 0.0}}
    (run / "best.json").write_text(json.dumps(best))
    record = {"objective": load_objective("worst_loss", domains).to_dict()}
    (run / "run.json").write_text(json.dumps(record))
    result = validate(pool, run_dir=run, top_picks=1, **COMMON)
    assert result["mixtures"][0]["label"] == "search:best"
    assert result["objective"]["name"] == "worst_loss"
    for m in result["mixtures"]:
        for side in ("proxy", "real"):
            assert m[side]["objective"] == pytest.approx(m[side]["worst_loss"], abs=1e-12)
    assert (run / "validation" / "report.md").is_file()
    # A run whose objective reads lm-eval metrics needs the tasks named.
    lmeval = {"terms": [{"source": "lmeval", "metric": "acc", "direction": "maximize"}]}
    (run / "run.json").write_text(json.dumps({"objective": lmeval}))
    with pytest.raises(MergeMixError, match=r"search's objective .*name the tasks with --tasks"):
        validate(pool, run_dir=run, top_picks=1, **COMMON)


def test_weak_points_say_where_calibration_helps_and_where_it_hurts(validated):
    import copy

    from merge_mix.validate.summary import weak_points

    result = copy.deepcopy(validated[2])
    raw, cal = result["fidelity"]["raw"]["targets"], result["fidelity"]["calibrated"]["targets"]
    for t in raw:  # calibration neither helps nor hurts, except where planted below
        cal[t]["spearman"]["value"] = raw[t]["spearman"]["value"]
    raw["heldout/c/loss"]["spearman"]["value"] = 0.99
    cal["heldout/c/loss"]["spearman"]["value"] = 0.70
    raw["heldout/code/loss"]["spearman"]["value"] = 0.90
    cal["heldout/code/loss"]["spearman"]["value"] = 0.88  # within 0.05: not called worse
    result["verdict"].update(mean_loss_spearman=0.78, mean_loss_spearman_calibrated=0.96)
    lines = weak_points(result)
    assert (
        "Calibration helps: leave-one-out Spearman on the mean loss rises from 0.78 to 0.96."
        in lines
    )
    hurt = [line for line in lines if line.startswith("Calibration lowers")]
    assert hurt == [
        "Calibration lowers the leave-one-out Spearman of c 0.99 -> 0.70: its gap models overfit"
        " these references there; read those targets' raw proxies."
    ]
    result["verdict"].update(mean_loss_spearman=0.95, mean_loss_spearman_calibrated=0.80)
    assert any("do not use --calibrated with this pool" in line for line in weak_points(result))


def test_fidelity_on_a_target_set(validated, tmp_path):
    """A target set added to a validated pool is judged like a domain (its own fidelity row
    and regret interval, out of the mean), and an objective naming it is validated too;
    the references are reused, none trained."""
    import sysconfig
    from pathlib import Path

    from merge_mix.config import DomainSpec, SourceSpec
    from merge_mix.targets import add_target

    pool = tmp_path / "pool"
    shutil.copytree(validated[0], pool)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    glob = str(stdlib / "http" / "*.py")
    add_target(pool, DomainSpec("web", (SourceSpec("files", glob),)))
    before = _weights_mtimes(pool)
    result = validate(pool, out_dir=tmp_path / "out", objective="target-set:web", **COMMON)
    assert [m["status"] for m in result["mixtures"]] == ["reused"] * 6
    assert _weights_mtimes(pool) == before
    key = "target/web/loss"
    raw = result["fidelity"]["raw"]["targets"]
    assert key in raw and "objective" in raw
    # The objective is the target set's loss: the same ranking, the same numbers.
    assert raw["objective"]["spearman"]["value"] == raw[key]["spearman"]["value"]
    for m in result["mixtures"]:
        assert m["real"][key] == pytest.approx(m["real"]["objective"])
        assert m["real"][key] > 0
    # The mean over domains does not include the target set.
    m = result["mixtures"][0]
    domains = [m["real"][f"heldout/{d}/loss"] for d in ("code", "c", "prose")]
    assert m["real"]["mean_loss"] == pytest.approx(np.mean(domains))
    assert key in result["fidelity"]["calibrated"]["targets"]
    summary = format_summary(result)
    assert "target set web" in summary
