"""Reports from real (fake-scored) search runs: the test-split verdict heads the report with
its interval, search-split numbers are labelled as such, and every plot axis names its unit."""

from __future__ import annotations

import json
import shutil

import pytest

from merge_mix.compare import sentence, verdict_of
from merge_mix.errors import MergeMixError
from merge_mix.objective import load_objective
from merge_mix.report import objective_unit, write_report
from merge_mix.report_plots import (
    figure_comparisons,
    figure_domain_losses,
    figure_objective,
    figure_ternary,
    figure_test_domains,
    figure_top_weights,
)
from merge_mix.search import SearchConfig, run_search
from merge_mix.search.fake import FakeScorer
from merge_mix.search.study import attach_verdict

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
UNIT = "nats/token"
# Axis labels must carry one of these: a unit, or what a categorical axis enumerates.
UNIT_WORDS = ("(nats/token)", "(bits/byte)", "merge weight", "trial number", "domain", "comparison")
# (delta = pick - uniform, lo, hi) of the objective on the test split, and the headline.
VERDICTS = {
    "better": (
        (-0.0123, -0.0190, -0.0050),
        "better than uniform by 0.0123 [0.0050, 0.0190] nats/token on the test split",
    ),
    "not distinguishable": (
        (-0.0020, -0.0060, 0.0030),
        "not distinguishable from uniform on the test split "
        "(gain 0.0020 [-0.0030, 0.0060] nats/token)",
    ),
    "worse": (
        (0.0040, 0.0010, 0.0080),
        "worse than uniform by 0.0040 [0.0010, 0.0080] nats/token on the test split",
    ),
}


def search(run_dir, scorer, **overrides):
    config = SearchConfig(
        **{"n_trials": 8, "storage": ":memory:", "progress": False, "surrogate": False, **overrides}
    )
    return run_search(scorer, load_objective("mean_loss"), config, run_dir)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A finished 3-domain search run (no verdict yet); tests copy it."""
    run_dir = tmp_path_factory.mktemp("searched")
    search(run_dir, FakeScorer(), sampler="tpe", n_trials=12, surrogate=True)
    return run_dir


@pytest.fixture
def run_dir(searched, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(searched, copy)
    return copy


def comparison(delta, lo, hi, other):
    c = {
        "delta": delta,
        "lo": lo,
        "hi": hi,
        "verdict": verdict_of(lo, hi),
        "confidence": 0.95,
        "n_boot": 2000,
        "documents": {"web": 40, "code": 30, "math": 20},
    }
    return {**c, "unit": UNIT, "sentence": sentence(c, other, UNIT)}


def write_verdict(run_dir, uniform, trial=None):
    """A verdict.json as `merge_mix.search.verdict.judge` writes it, with planted numbers,
    merged into best.json by the study's own code."""
    best = json.loads((run_dir / "best.json").read_text())
    verdict = {
        "split": "test",
        "unit": UNIT,
        "trial": best["number"] if trial is None else trial,
        "objective": {"pick": 2.10, "uniform": 2.10 - uniform[0], "natural": 2.13},
        "comparisons": {
            "uniform": comparison(*uniform, "uniform"),
            "natural": comparison(-0.031, -0.042, -0.020, "natural"),
            "natural vs uniform": comparison(0.0187, 0.0101, 0.0265, "uniform"),
        },
        "per_domain_loss": {
            "web": {"pick": 2.40, "uniform": 2.45, **comparison(-0.05, -0.07, -0.03, "uniform")},
            "code": {"pick": 1.61, "uniform": 1.60, **comparison(0.01, -0.004, 0.02, "uniform")},
            "math": {"pick": 2.29, "uniform": 2.25, **comparison(0.04, 0.02, 0.06, "uniform")},
        },
        "documents": {"web": 40, "code": 30, "math": 20},
        "tokens": {"web": 52_100, "code": 31_000, "math": 20_480},
        "fixed_terms": [],
        "settings": {"numbers": {"pick": best["number"]}},
    }
    verdict["verdict"] = verdict["comparisons"]["uniform"]["verdict"]
    verdict["sentence"] = verdict["comparisons"]["uniform"]["sentence"]
    (run_dir / "verdict.json").write_text(json.dumps(verdict))
    attach_verdict(run_dir)
    return best


@pytest.mark.parametrize("word", list(VERDICTS))
def test_headline_is_the_test_split_verdict_with_its_interval(run_dir, word):
    numbers, expected = VERDICTS[word]
    best = write_verdict(run_dir, numbers)
    report = write_report(run_dir)

    assert report.verdict == word
    assert report.beats_uniform is (word == "better")
    pick = f"the pick (trial #{best['number']}, {best['kind']})"
    assert report.headline == f"Verdict: {pick} is {expected}."
    markdown = report.markdown.read_text()
    assert markdown.split("\n")[2] == f"**{report.headline}**"
    # Where it was measured: documents and tokens per domain, confidence.
    assert "web 40 documents / 52,100 tokens, code 30 documents / 31,000 tokens" in markdown
    assert "95% paired bootstrap intervals over documents (2000 resamples)" in markdown
    # Every comparison with its interval (a gain: positive favours the first mixture).
    gain, lo, hi = -numbers[0], -numbers[2], -numbers[1]
    assert f"| pick vs uniform | {gain:+.4f} [{lo:+.4f}, {hi:+.4f}] | {word} |" in markdown
    assert "| pick vs natural | +0.0310 [+0.0200, +0.0420] | better |" in markdown
    assert "| natural vs uniform | -0.0187 [-0.0265, -0.0101] | worse |" in markdown
    # Per-domain table: pick vs uniform loss on the test split, gain with interval, verdict.
    assert "| web | 2.4000 | 2.4500 | +0.0500 [+0.0300, +0.0700] | better |" in markdown
    assert "| code | 1.6100 | 1.6000 | -0.0100 [-0.0200, +0.0040] | not distinguishable |" in (
        markdown
    )
    assert "| math | 2.2900 | 2.2500 | -0.0400 [-0.0600, -0.0200] | worse |" in markdown
    # The search-split numbers stay, labelled as biased in the pick's favour.
    assert "## On the search split, where the pick was selected" in markdown
    assert "biased in the pick's favour" in markdown
    assert "beats the uniform baseline" not in markdown

    names = [p.name for p in report.plots]
    assert names == [
        "test_comparisons.png",
        "test_domain_losses.png",
        "objective_over_trials.png",
        "domain_losses.png",
        "top_weights.png",
        "ternary.png",
    ]
    for path in report.plots:
        assert path.read_bytes().startswith(PNG_MAGIC)
    page = report.html.read_text()
    assert page.count('src="data:image/png;base64,') == 6
    assert f"<strong>Verdict: {pick} is {expected}.</strong>" in page


def test_report_without_a_verdict_claims_no_gain(run_dir):
    best = json.loads((run_dir / "best.json").read_text())
    # On the search split the pick does beat uniform; the report must not say so as a verdict.
    assert best["baselines"]["uniform"]["beaten"] is True
    report = write_report(run_dir)

    assert report.verdict is None and report.beats_uniform is None
    assert report.headline.startswith(
        f"Not judged on the test split: the pick (trial #{best['number']}, {best['kind']})"
    )
    assert "claims no gain over uniform" in report.headline
    assert "no verdict.json" in report.headline
    markdown = report.markdown.read_text()
    assert "better than" not in markdown and "beats" not in markdown
    assert "## Verdict on the test split" not in markdown
    assert "biased in the pick's favour" in markdown
    assert {p.name for p in report.plots} == {
        "objective_over_trials.png",
        "domain_losses.png",
        "top_weights.png",
        "ternary.png",
    }


def test_a_verdict_on_another_trial_is_not_the_verdict(run_dir):
    best = json.loads((run_dir / "best.json").read_text())
    write_verdict(run_dir, VERDICTS["better"][0], trial=best["number"] + 100)
    report = write_report(run_dir)

    assert report.beats_uniform is None
    assert f"verdict.json judged trial #{best['number'] + 100}" in report.headline


def test_two_domain_report_has_no_simplex(tmp_path):
    symmetric = FakeScorer(
        domains=("a", "b"),
        c=(1.0, 1.0),
        k=(2.0, 2.0),
        t=(3.0, 3.0),
        natural=(0.8, 0.2),
        available_tokens=(8e9, 2e9),
    )
    search(tmp_path, symmetric, sampler="random")
    report = write_report(tmp_path)

    assert "Objective over the simplex" not in report.markdown.read_text()
    assert not (tmp_path / "ternary.png").exists()


def units_of(fig):
    """Every labelled axis of a figure: (label, has ticks) for each axis that shows values."""
    labels = []
    for ax in fig.axes:
        if not ax.axison:
            continue
        for axis, ticks in ((ax.xaxis, ax.get_xticks()), (ax.yaxis, ax.get_yticks())):
            if len(ticks):
                labels.append(axis.get_label_text())
    return labels


def test_every_plot_axis_names_its_unit(run_dir):
    write_verdict(run_dir, VERDICTS["better"][0])
    rows = [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]
    best = json.loads((run_dir / "best.json").read_text())
    test = best["test"]
    domains = best["domains"]
    figures = {
        "comparisons": figure_comparisons(test),
        "test domains": figure_test_domains(test),
        "objective": figure_objective(rows, UNIT),
        "domain losses": figure_domain_losses(rows, best),
        "top weights": figure_top_weights(rows, domains),
        "ternary": figure_ternary(rows, domains, UNIT),
    }
    for name, fig in figures.items():
        labels = units_of(fig)
        assert labels, name
        for label in labels:
            assert any(word in label for word in UNIT_WORDS), (name, label)

    forest = figures["comparisons"].axes[0]
    assert forest.get_xlabel().startswith(
        "objective gain over the other mixture (nats/token), test split, 95% interval"
    )
    rows_top_down = sorted(
        zip(forest.get_yticks(), (t.get_text() for t in forest.get_yticklabels()), strict=True),
        reverse=True,
    )
    assert [label for _, label in rows_top_down] == [
        "pick vs uniform",
        "pick vs natural",
        "natural vs uniform",
    ]
    # The zero line the intervals are read against.
    assert any(list(line.get_xdata()) == [0, 0] for line in forest.get_lines())
    left, right = figures["test domains"].axes
    assert left.get_ylabel() == "held-out loss (nats/token), test split"
    assert right.get_ylabel().startswith("loss gain over uniform (nats/token)")
    assert figures["objective"].axes[0].get_xlabel() == "trial number"
    assert (
        figures["objective"].axes[0].get_ylabel().startswith("objective (nats/token), search split")
    )
    assert figures["domain losses"].axes[0].get_ylabel() == (
        "held-out loss (nats/token), search split"
    )
    assert figures["top weights"].axes[0].get_ylabel().startswith("merge weight")
    ternary = figures["ternary"]
    assert "merge weights" in ternary.get_suptitle()
    assert ternary.axes[1].get_ylabel().startswith("objective (nats/token), search split")


def test_objective_unit_without_a_verdict_comes_from_the_objective(run_dir):
    best = json.loads((run_dir / "best.json").read_text())
    assert objective_unit(best) == "nats/token"
    assert objective_unit({"objective_spec": {"terms": "broken"}}) == "objective units"


def test_report_needs_a_search_first(tmp_path):
    with pytest.raises(MergeMixError, match="trials.jsonl not found"):
        write_report(tmp_path)
