"""Reports from real (fake-scored) search runs: files, sections, and the verdict on uniform."""

from __future__ import annotations

import pytest

from merge_mix.errors import MergeMixError
from merge_mix.objective import load_objective
from merge_mix.report import write_report
from merge_mix.search import SearchConfig, run_search
from merge_mix.search.fake import FakeScorer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def search(run_dir, scorer, **overrides):
    config = SearchConfig(
        **{"n_trials": 8, "storage": ":memory:", "progress": False, "surrogate": False, **overrides}
    )
    return run_search(scorer, load_objective("mean_loss"), config, run_dir)


def test_report_of_a_search_that_beats_uniform(tmp_path):
    search(
        tmp_path,
        FakeScorer(),
        sampler="tpe",
        n_trials=12,
        surrogate=True,
        surrogate_candidates=5000,
    )
    report = write_report(tmp_path)

    assert report.beats_uniform is True
    markdown = report.markdown.read_text()
    assert "The best mixture beats the uniform baseline on the objective" in markdown
    for section in (
        "## Best mixture against the baselines",
        "## Objective over trials",
        "## Top trials",
        "## Objective over the simplex",
        "## Surrogate",
    ):
        assert section in markdown
    names = {p.name for p in report.plots}
    assert names == {
        "objective_over_trials.png",
        "domain_losses.png",
        "top_weights.png",
        "ternary.png",
    }
    for path in report.plots:
        assert path.read_bytes().startswith(PNG_MAGIC)
    page = report.html.read_text()
    assert page.count('src="data:image/png;base64,') == 4
    assert "<strong>The best mixture beats the uniform baseline" in page


def test_report_says_does_not_beat_when_uniform_is_best(tmp_path):
    # Symmetric domains: the uniform mixture is the exact optimum of the mean loss.
    symmetric = FakeScorer(
        domains=("a", "b"),
        c=(1.0, 1.0),
        k=(2.0, 2.0),
        t=(3.0, 3.0),
        natural=(0.8, 0.2),
        available_tokens=(8e9, 2e9),
    )
    result = search(tmp_path, symmetric, sampler="random")
    assert result.best["kind"] == "baseline:uniform"
    report = write_report(tmp_path)

    assert report.beats_uniform is False
    assert "does not beat the uniform baseline" in report.markdown.read_text()
    assert "Objective over the simplex" not in report.markdown.read_text()
    assert not (tmp_path / "ternary.png").exists()


def test_report_needs_a_search_first(tmp_path):
    with pytest.raises(MergeMixError, match="trials.jsonl not found"):
        write_report(tmp_path)
