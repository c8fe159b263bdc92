"""Verdicts: per-document scores, paired bootstrap intervals, and a search judged on the
test split it never read."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from merge_mix.cli import main
from merge_mix.compare import compare_models, paired_bootstrap, sentence, verdict_of
from merge_mix.evaluate import DocumentScores, document_scores, heldout_metrics


def _scores(nll, tokens, nbytes=None):
    tokens = np.asarray(tokens, dtype=float)
    return DocumentScores(
        nll=np.asarray(nll, dtype=float),
        tokens=tokens,
        bytes=np.asarray(nbytes if nbytes is not None else tokens * 4, dtype=float),
    )


def _loss(domain):
    return lambda m: m[f"heldout/{domain}/loss"]


def test_identical_models_are_not_distinguishable():
    rng = np.random.default_rng(0)
    a = {"d": _scores(rng.uniform(50, 150, 40), rng.integers(20, 60, 40))}
    c = paired_bootstrap(a, a, _loss("d"), n_boot=200)
    assert c.delta == 0 and c.lo == 0 and c.hi == 0
    assert c.verdict == "not distinguishable" and c.documents == {"d": 40}


def test_a_planted_constant_gain_is_recovered_with_a_tight_interval():
    """b loses exactly 0.01 nats more on every token of every document: the paired
    difference is -0.01 on every resample, whatever the documents' own spread."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(20, 200, 60).astype(float)
    nll_a = tokens * rng.uniform(2.0, 6.0, 60)  # documents differ a lot in difficulty
    a = {"d": _scores(nll_a, tokens)}
    b = {"d": _scores(nll_a + 0.01 * tokens, tokens)}
    c = paired_bootstrap(a, b, _loss("d"), n_boot=300)
    assert c.delta == pytest.approx(-0.01, abs=1e-12)
    assert c.lo == pytest.approx(-0.01, abs=1e-9) and c.hi == pytest.approx(-0.01, abs=1e-9)
    assert c.verdict == "better"
    text = sentence(c.to_dict(), "uniform", "nats/token")
    assert text.startswith("better than uniform by 0.0100 [0.0100, 0.0100] nats/token")
    assert paired_bootstrap(b, a, _loss("d"), n_boot=300).verdict == "worse"


def test_noise_larger_than_the_gain_is_not_distinguishable():
    """A gain of 0.001 nats/token on average, with per-document differences of +-0.5:
    the interval straddles zero."""
    rng = np.random.default_rng(2)
    tokens = np.full(30, 100.0)
    nll_a = tokens * 4.0
    noise = rng.choice([-0.5, 0.5], 30) * tokens
    b = {"d": _scores(nll_a + noise - noise.mean() + 0.1, tokens)}
    c = paired_bootstrap({"d": _scores(nll_a, tokens)}, b, _loss("d"), n_boot=500)
    assert c.delta == pytest.approx(-0.001, abs=1e-9)
    assert c.lo < 0 < c.hi and c.verdict == "not distinguishable"
    assert verdict_of(-0.2, -0.1) == "better" and verdict_of(0.1, 0.2) == "worse"


def test_compare_models_refuses_different_documents():
    a = {"d": _scores([1.0, 2.0], [10, 20])}
    b = {"d": _scores([1.0, 2.0], [10, 21])}
    with pytest.raises(ValueError, match="different documents"):
        compare_models({"a": a, "b": b}, lambda m: {k: 0.0 for k in m}, [("a", "b")])


def test_document_scores_add_up_to_the_heldout_metrics(tiny_pool):
    from merge_mix.proxy import ProxyScorer

    scorer = ProxyScorer(tiny_pool, device="cpu", split="test")
    model = scorer.merger.merge(np.full(3, 1 / 3))
    scores = document_scores(model, scorer.heldout)
    metrics = heldout_metrics(model, scorer.heldout)
    data = json.loads((tiny_pool / "data" / "data.json").read_text())
    for d, s in scores.items():
        assert len(s.nll) == data["domains"][d]["test"]["documents"]
        assert s.tokens.sum() == data["domains"][d]["test"]["tokens"]
        assert s.nll.sum() / s.tokens.sum() == pytest.approx(metrics[f"heldout/{d}/loss"])
    # The test split is not the search split.
    search = ProxyScorer(tiny_pool, device="cpu").heldout
    assert search.split == "search" and scorer.heldout.split == "test"
    assert search.tokens() != scorer.heldout.tokens()


def test_search_is_judged_on_the_test_split(tiny_pool, tmp_path):
    from merge_mix.objective import load_objective
    from merge_mix.search.config import SearchConfig
    from merge_mix.search.pipeline import format_search_summary, search_pool

    run = tmp_path / "run"
    summary = search_pool(
        tiny_pool,
        load_objective("mean_loss", ["code", "c", "prose"]),
        SearchConfig(n_trials=4, progress=False),
        run,
        None,
        {"device": "cpu"},
    )
    verdict = json.loads((run / "verdict.json").read_text())
    best = json.loads((run / "best.json").read_text())
    assert best["selected_on"] == "search"
    assert best["verdict"] == verdict["verdict"] in ("better", "not distinguishable", "worse")
    assert best["test"]["comparisons"]["uniform"]["sentence"] == best["verdict_sentence"]
    c = verdict["comparisons"]["uniform"]
    assert c["lo"] <= c["delta"] <= c["hi"] and c["unit"] == "nats/token"
    assert verdict["objective"]["pick"] - verdict["objective"]["uniform"] == pytest.approx(
        c["delta"]
    )
    data = json.loads((tiny_pool / "data" / "data.json").read_text())
    assert verdict["documents"] == {
        d: data["domains"][d]["test"]["documents"] for d in ("code", "c", "prose")
    }
    # The pick's test-split objective is what scoring it on the test split gives.
    from merge_mix.proxy import ProxyScorer

    test = ProxyScorer(tiny_pool, device="cpu", split="test")
    w = [best["merge_weights"][d] for d in test.domains]
    metrics = test.score(w)
    mean = np.mean([metrics[f"heldout/{d}/loss"] for d in test.domains])
    assert verdict["objective"]["pick"] == pytest.approx(mean, rel=1e-9)
    assert "verdict on the test split" in format_search_summary(summary)
    assert best["verdict_sentence"] in format_search_summary(summary)


def test_eval_names_the_split_and_compares_with_intervals(tiny_pool):
    result = CliRunner().invoke(
        main,
        ["eval", str(tiny_pool), "--weights", "uniform", "--weights", "code", "--split", "test"],
    )
    assert result.exit_code == 0, result.output
    assert "test split" in result.output
    assert "than uniform" in result.output or "from uniform" in result.output
    out = CliRunner().invoke(main, ["eval", str(tiny_pool), "--weights", "uniform", "--json"])
    payload = json.loads(out.output)
    assert payload["split"] == "search" and set(payload["documents"]) == {"code", "c", "prose"}
