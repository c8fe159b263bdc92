"""Turn a search run directory into report.md and a self-contained report.html.

Reads `trials.jsonl` and `best.json` (and `verdict.json`, `run.json` if present) written by
`merge_mix.search`, and writes next to them:
  report.md, report.html          the same sections; the HTML embeds its plots as base64 PNG
  test_comparisons.png            the verdict: every test-split comparison's gain with its interval
  test_domain_losses.png          per-domain test-split loss, pick vs uniform, and the gain's interval
  objective_over_trials.png       every trial's objective (search split), with the best-so-far line
  domain_losses.png               per-domain loss on the search split: best mixtures vs baselines
  top_weights.png                 merge weights of the best trials, stacked
  ternary.png                     objective over the simplex (exactly 3 domains only)

The headline is the verdict on the test split (`merge_mix.search.verdict`): the pick is
better than, not distinguishable from, or worse than the uniform mixture (Aioli: uniform is
the baseline to beat), with a paired bootstrap interval. A run without a verdict is said to
be "not judged on the test split" and no gain is claimed. Numbers from the search split are
kept but labelled as such: the pick was selected on them, so they are biased in its favour.
Every plot axis names its unit; the plots are drawn by `merge_mix.report_plots`.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge_mix.artifacts import write_atomic
from merge_mix.errors import MergeMixError
from merge_mix.report_plots import (
    METRIC_UNITS,
    SEARCH_SPLIT,
    TOP_TRIALS,
    comparison_sides,
    figure_comparisons,
    figure_domain_losses,
    figure_objective,
    figure_ternary,
    figure_test_domains,
    figure_top_weights,
    gain_interval,
    loss_metric,
    save_png,
)


@dataclass(frozen=True)
class Report:
    """Paths written by `write_report`, and the headline verdict."""

    markdown: Path
    html: Path
    plots: list[Path]
    headline: str
    """The report's first sentence: the test-split verdict, or that there is none."""
    verdict: str | None
    """The test-split verdict against uniform: "better", "not distinguishable", "worse", or
    None when the pick was not judged on the test split."""
    beats_uniform: bool | None
    """True only when the test-split verdict is "better"; None when there is no verdict."""


def _load(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    trials_path, best_path = run_dir / "trials.jsonl", run_dir / "best.json"
    for path in (trials_path, best_path):
        if not path.is_file():
            raise MergeMixError(f"report: {path} not found; run a search into {run_dir} first")
    try:
        rows = [json.loads(line) for line in trials_path.read_text().splitlines() if line]
        best = json.loads(best_path.read_text())
    except json.JSONDecodeError as err:
        raise MergeMixError(f"report: {run_dir} holds a malformed JSON file ({err})") from None
    run_path = run_dir / "run.json"
    run = json.loads(run_path.read_text()) if run_path.is_file() else {}
    return rows, best, run


def load_verdict(run_dir: Path, best: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The test-split verdict on the best trial (best.json's ``test``, else a verdict.json
    made for the same trial), and, when there is none, why."""
    if best.get("test"):
        return dict(best["test"]), ""
    path = Path(run_dir) / "verdict.json"
    if not path.is_file():
        return None, "the run has no verdict.json (an older run, or the verdict was skipped)"
    try:
        judged = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MergeMixError(f"report: {path} is malformed JSON ({err})") from None
    if judged.get("trial") != best["number"]:
        return None, (
            f"verdict.json judged trial #{judged.get('trial')}, not the current best "
            f"#{best['number']}; run the search again to judge it"
        )
    return {k: v for k, v in judged.items() if k != "settings"}, ""


def objective_unit(best: Mapping[str, Any], test: Mapping[str, Any] | None = None) -> str:
    """The unit of the run's objective: the verdict's, else derived from the objective spec."""
    if test and test.get("unit"):
        return str(test["unit"])
    from merge_mix.compare import unit_of
    from merge_mix.objective import objective_from_dict

    try:
        return unit_of(objective_from_dict(best["objective_spec"]))
    except (KeyError, MergeMixError):
        return "objective units"


def headline(best: Mapping[str, Any], test: Mapping[str, Any] | None, why: str = "") -> str:
    """The report's first sentence: the pick's test-split verdict against uniform."""
    pick = f"the pick (trial #{best['number']}, {best['kind']})"
    if test is None:
        return (
            f"Not judged on the test split: {pick} was selected on the search split and has "
            "no test-split verdict, so this report claims no gain over uniform"
            + (f" ({why})." if why else ".")
        )
    uniform = test["comparisons"]["uniform"]
    return f"Verdict: {pick} is {uniform['sentence']}."


def measured_on(test: Mapping[str, Any]) -> str:
    """Where and how the verdict was measured: documents and tokens per domain, confidence."""
    uniform = test["comparisons"]["uniform"]
    per_domain = ", ".join(
        f"{d} {n:,} documents / {test['tokens'][d]:,} tokens" for d, n in test["documents"].items()
    )
    text = (
        f"Measured on every document of the test split, which the search never read "
        f"({per_domain}); {uniform['confidence']:.0%} paired bootstrap intervals over "
        f"documents ({uniform['n_boot']} resamples). A gain is how much lower the first "
        f"mixture's objective is than the other's, in {test['unit']}: positive favours it."
    )
    if test.get("fixed_terms"):
        text += (
            " Benchmark terms (" + ", ".join(test["fixed_terms"]) + ") were held at their "
            "search-split values, so the intervals cover the held-out terms only."
        )
    return text


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _interval(c: Mapping[str, Any]) -> str:
    gain, lo, hi = gain_interval(c)
    return f"{gain:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def _verdict_blocks(
    rows: list[dict[str, Any]], best: dict[str, Any], test: dict[str, Any]
) -> list[tuple[str, Any]]:
    """The test-split section: comparisons, objective per mixture, per-domain losses."""
    unit = test["unit"]
    confidence = test["comparisons"]["uniform"]["confidence"]
    blocks: list[tuple[str, Any]] = [("h2", "Verdict on the test split")]
    blocks.append(
        (
            "table",
            (
                [
                    "comparison",
                    f"gain ({unit}) [{confidence:.0%} interval]",
                    "verdict",
                ],
                [
                    [f"{a} vs {b}", _interval(c), c["verdict"]]
                    for a, b, c in (
                        (*comparison_sides(name), c) for name, c in test["comparisons"].items()
                    )
                ],
            ),
        )
    )
    blocks.append(("img", "test_comparisons.png"))

    search_objective = {
        "pick": (best["number"], best["objective"]),
        **{
            name: (base["number"], base["objective"])
            for name, base in best["baselines"].items()
            if base is not None
        },
    }
    by_number = {r["number"]: r for r in rows}
    table = []
    for name, value in test["objective"].items():
        number, searched = search_objective.get(name, (None, None))
        found = re.search(r"#(\d+)", name)
        if number is None and found:
            number = int(found.group(1))
            searched = by_number.get(number, {}).get("objective")
        table.append([name, "" if number is None else f"#{number}", _fmt(value), _fmt(searched)])
    blocks.append(("h2", "Objective per mixture: test split and search split"))
    blocks.append(
        (
            "p",
            "The search split is where the pick was selected, so its number there is biased "
            "in its favour; the test split is not.",
        )
    )
    blocks.append(
        (
            "table",
            (
                ["mixture", "trial", f"test split ({unit})", f"{SEARCH_SPLIT} ({unit})"],
                table,
            ),
        )
    )

    per = test["per_domain_loss"]
    blocks.append(("h2", "Loss per domain and target set on the test split: pick vs uniform"))
    blocks.append(
        (
            "table",
            (
                [
                    "domain (target/: a target set)",
                    "pick loss (nats/token)",
                    "uniform loss (nats/token)",
                    f"gain (nats/token) [{confidence:.0%} interval]",
                    "verdict",
                ],
                [
                    [d, _fmt(c["pick"]), _fmt(c["uniform"]), _interval(c), c["verdict"]]
                    for d, c in per.items()
                ],
            ),
        )
    )
    blocks.append(("img", "test_domain_losses.png"))
    return blocks


def _sections(
    rows: list[dict[str, Any]],
    best: dict[str, Any],
    run: dict[str, Any],
    test: dict[str, Any] | None,
    first: str,
) -> list[tuple[str, Any]]:
    """The report as blocks: ("h2", text), ("p", text), ("table", (header, rows)), ("img", name)."""
    domains = best["domains"]
    spec = best.get("objective_spec", {})
    unit = objective_unit(best, test)
    blocks: list[tuple[str, Any]] = [("p", f"**{first}**")]
    if test is not None:
        blocks.append(("p", measured_on(test)))
    if not best["feasible"]:
        blocks.append(("p", "No scored mixture satisfies the objective's constraints."))
    config = run.get("config", {})
    blocks.append(
        (
            "p",
            f"Objective `{spec.get('name', '?')}` (lower is better, in {unit}) over "
            f"{len(domains)} domains ({', '.join(domains)}); {len(rows)} trials"
            + (f", sampler `{config['sampler']}`" if "sampler" in config else "")
            + f". The pick is trial #{best['number']} ({best['kind']}), selected on the "
            f"search split with objective {best['objective']:.4f} there"
            + ("" if best["feasible"] else " (infeasible)")
            + ".",
        )
    )
    if test is not None:
        blocks += _verdict_blocks(rows, best, test)

    blocks.append(("h2", "On the search split, where the pick was selected"))
    metric = loss_metric(rows, domains[0])
    uniform = best["baselines"].get("uniform")
    text = (
        "Every number in this section and below is measured on the search split, the data "
        "the pick was selected on, so it is biased in the pick's favour"
        + ("; the verdict above is measured on the test split." if test else ".")
    )
    if uniform is not None:
        text += (
            f" There the pick's objective is {best['objective']:.4f} {unit} against uniform's "
            f"{uniform['objective']:.4f} ({best['objective'] - uniform['objective']:+.4f})."
        )
    blocks.append(("p", text))
    metric_unit = METRIC_UNITS[metric]
    header = ["mixture", f"objective ({unit})"] + [f"{d} {metric} ({metric_unit})" for d in domains]
    by_number = {r["number"]: r for r in rows}
    table = [
        ["pick #" + str(best["number"]), _fmt(best["objective"])]
        + [_fmt(best["metrics"].get(f"heldout/{d}/{metric}")) for d in domains]
    ]
    for name, base in best["baselines"].items():
        if base is None:
            continue
        r = by_number.get(base["number"], {"metrics": {}})
        table.append(
            [name, _fmt(base["objective"])]
            + [_fmt(r["metrics"].get(f"heldout/{d}/{metric}")) for d in domains]
        )
    blocks.append(("table", (header, table)))
    weights = ", ".join(f"{d} {best['merge_weights'][d]:.3f}" for d in domains)
    mixture = ", ".join(f"{d} {best['effective_mixture'][d]:.3f}" for d in domains)
    blocks.append(("p", f"Merge weights: {weights}. Effective data mixture: {mixture}."))
    blocks.append(("img", "domain_losses.png"))

    blocks.append(("h2", "Objective over trials (search split)"))
    blocks.append(("img", "objective_over_trials.png"))

    blocks.append(("h2", "Top trials (search split)"))
    top = sorted((r for r in rows if r["full_budget"]), key=lambda r: r["objective"])[:TOP_TRIALS]
    blocks.append(
        (
            "table",
            (
                ["trial", "kind", "worker", f"objective ({unit})", "feasible"]
                + [f"{d} merge weight" for d in domains],
                [
                    [
                        str(r["number"]),
                        r["kind"],
                        str(r["worker"]),
                        _fmt(r["objective"]),
                        _fmt(r["feasible"]),
                    ]
                    + [f"{r['merge_weights'][d]:.3f}" for d in domains]
                    for r in top
                ],
            ),
        )
    )
    blocks.append(("img", "top_weights.png"))
    if len(domains) == 3:
        blocks.append(("h2", "Objective over the simplex (search split)"))
        blocks.append(("img", "ternary.png"))

    for worker, summary in (best.get("halving") or {}).items():
        blocks.append(("h2", f"Successive halving (worker {worker})"))
        text = (
            f"{summary['candidates']} candidates, eta {summary['eta']}, budgets "
            f"{summary['budgets']} tokens per domain for {summary['sizes']} candidates: "
            f"{summary['speedup']:.2f}x fewer scored tokens than scoring all at full budget."
        )
        verified = summary.get("verified")
        if verified:
            same = "the same pick" if verified["same_pick"] else "a different pick"
            text += f" Full-budget scoring of every candidate gives {same}."
        blocks.append(("p", text))

    surrogate = best.get("surrogate")
    if surrogate and "fits" in surrogate:
        blocks.append(("h2", "Surrogate (search split)"))
        blocks.append(
            (
                "p",
                f"Averaged the top {surrogate['top_k']} of {surrogate['candidates']} simulated "
                f"mixtures; predicted objective {surrogate['predicted_objective']:.4f} {unit}, "
                f"scored {surrogate['objective']:.4f} (trial #{surrogate['number']}).",
            )
        )
        blocks.append(
            (
                "table",
                (
                    ["metric", "chosen", "Spearman (mixing law)", "Spearman (kernel)"],
                    [
                        [
                            name,
                            fit["chosen"],
                            _fmt(fit["spearman"]["mixing_law"]),
                            _fmt(fit["spearman"]["kernel"]),
                        ]
                        for name, fit in surrogate["fits"].items()
                    ],
                ),
            )
        )
    return blocks


def render_markdown(title: str, blocks: list[tuple[str, Any]]) -> str:
    """Markdown for report blocks: ("h2", text), ("p", text), ("img", png name) or
    ("table", (header, rows))."""
    out = [f"# {title}", ""]
    for kind, content in blocks:
        if kind == "h2":
            out += [f"## {content}", ""]
        elif kind == "p":
            out += [content, ""]
        elif kind == "img":
            out += [f"![{content}]({content})", ""]
        else:
            header, rows = content
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "---|" * len(header))
            out += ["| " + " | ".join(row) + " |" for row in rows]
            out.append("")
    return "\n".join(out)


def render_html(
    title: str,
    blocks: list[tuple[str, Any]],
    images: Mapping[str, bytes],
    page_width: str = "60em",
    image_width: str = "100%",
) -> str:
    """A self-contained HTML page for the same blocks, PNGs embedded as base64."""

    def inline(text: str) -> str:
        text = html.escape(text)
        for mark, tag in (("**", "strong"), ("`", "code")):
            parts = text.split(mark)
            text = "".join(p if i % 2 == 0 else f"<{tag}>{p}</{tag}>" for i, p in enumerate(parts))
        return text

    body = [f"<h1>{html.escape(title)}</h1>"]
    for kind, content in blocks:
        if kind == "h2":
            body.append(f"<h2>{html.escape(content)}</h2>")
        elif kind == "p":
            body.append(f"<p>{inline(content)}</p>")
        elif kind == "img":
            data = base64.b64encode(images[content]).decode()
            body.append(f'<img alt="{content}" src="data:image/png;base64,{data}">')
        else:
            header, rows = content
            lines = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
            for row in rows:
                lines.append("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>")
            body.append("<table>" + "".join(lines) + "</table>")
    style = (
        f"body{{font-family:sans-serif;max-width:{page_width};margin:2em auto;padding:0 1em}}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        f"padding:.2em .6em;text-align:right}}img{{max-width:{image_width};margin:.3em}}"
    )
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_report(run_dir: Path) -> Report:
    """Write report.md, report.html and the PNG plots into `run_dir`; see the module doc."""
    run_dir = Path(run_dir)
    rows, best, run = _load(run_dir)
    if not rows:
        raise MergeMixError(f"report: {run_dir / 'trials.jsonl'} has no trials")
    domains = best["domains"]
    test, why = load_verdict(run_dir, best)
    unit = objective_unit(best, test)
    figures = {}
    if test is not None:
        figures["test_comparisons.png"] = figure_comparisons(test)
        figures["test_domain_losses.png"] = figure_test_domains(test)
    figures["objective_over_trials.png"] = figure_objective(rows, unit)
    figures["domain_losses.png"] = figure_domain_losses(rows, best)
    figures["top_weights.png"] = figure_top_weights(rows, domains)
    if len(domains) == 3:
        figures["ternary.png"] = figure_ternary(rows, domains, unit)
    images = {name: save_png(fig, run_dir / name) for name, fig in figures.items()}
    first = headline(best, test, why)
    title = f"Mixture search: {run_dir.name}"
    blocks = _sections(rows, best, run, test, first)
    markdown, page = run_dir / "report.md", run_dir / "report.html"
    write_atomic(markdown, render_markdown(title, blocks))
    write_atomic(page, render_html(title, blocks, images))
    verdict = None if test is None else test["verdict"]
    return Report(
        markdown,
        page,
        [run_dir / name for name in images],
        first,
        verdict,
        None if verdict is None else verdict == "better",
    )
