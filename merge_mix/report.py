"""Turn a search run directory into report.md and a self-contained report.html.

Reads `trials.jsonl` and `best.json` (and `run.json` if present) written by
`merge_mix.search`, and writes next to them:
  report.md, report.html          the same sections; the HTML embeds its plots as base64 PNG
  objective_over_trials.png       every trial's objective, with the best-so-far line
  domain_losses.png               per-domain held-out loss: best mixtures vs the baselines
  top_weights.png                 merge weights of the best trials, stacked
  ternary.png                     objective over the simplex (exactly 3 domains only)

The report says plainly whether the best mixture beats the uniform baseline on the objective
(Aioli: uniform is the baseline to beat). Plots use matplotlib's Agg canvas, never pyplot.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from merge_mix.artifacts import write_atomic
from merge_mix.errors import MergeMixError

TOP_TRIALS = 10
BEST_BARS = 3


@dataclass(frozen=True)
class Report:
    """Paths written by `write_report`, and the headline verdict."""

    markdown: Path
    html: Path
    plots: list[Path]
    beats_uniform: bool | None
    """Whether the best mixture beats the uniform baseline (None: no uniform baseline)."""


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


def verdict(best: Mapping[str, Any]) -> tuple[str, bool | None]:
    """The sentence on best vs uniform, and whether it beats it (None: no uniform trial)."""
    uniform = best["baselines"].get("uniform")
    if uniform is None:
        return "No uniform baseline was scored, so nothing can be said against it.", None
    numbers = f"{best['objective']:.4f} vs {uniform['objective']:.4f}"
    if uniform["beaten"]:
        delta = best["objective"] - uniform["objective"]
        return (
            f"The best mixture beats the uniform baseline on the objective: {numbers} "
            f"({delta:+.4f}).",
            True,
        )
    return (
        f"The best mixture does not beat the uniform baseline on the objective ({numbers}); "
        "the uniform mixture is as good as anything this search found.",
        False,
    )


def _loss_metric(rows: Sequence[Mapping[str, Any]], domain: str) -> str:
    for metric in ("loss", "bpb", "ppl"):
        if f"heldout/{domain}/{metric}" in rows[0]["metrics"]:
            return metric
    return "loss"


def _new_figure(width: float = 7.0, height: float = 4.0) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _png(fig: Any, path: Path) -> bytes:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    data = buffer.getvalue()
    write_atomic(path, data)
    return data


def _clip_top(values: np.ndarray) -> float:
    # Penalised (infeasible) trials can sit orders of magnitude above the rest.
    return float(np.quantile(values, 0.9)) if len(values) > 5 else float(values.max())


def plot_objective(rows: Sequence[Mapping[str, Any]], path: Path) -> bytes:
    """Objective per trial, coloured by what proposed it, with the best-so-far line."""
    fig = _new_figure()
    ax = fig.add_subplot()
    numbers = np.array([r["number"] for r in rows])
    values = np.array([r["objective"] for r in rows], dtype=float)
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        label = r["kind"].split(":")[0] + ("" if r["full_budget"] else " (small budget)")
        groups.setdefault(label, []).append(i)
    for label, index in sorted(groups.items()):
        alpha = 0.35 if "small budget" in label else 0.9
        ax.scatter(numbers[index], values[index], s=18, alpha=alpha, label=label)
    full = [i for i, r in enumerate(rows) if r["full_budget"] and r["feasible"]]
    if full:
        best_so_far = np.minimum.accumulate(values[full])
        ax.step(numbers[full], best_so_far, where="post", color="black", lw=1.5, label="best")
    low, high = float(values.min()), _clip_top(values)
    pad = 0.05 * (high - low or 1.0)
    ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel("trial")
    ax.set_ylabel("objective (lower is better)")
    ax.legend(fontsize=8)
    return _png(fig, path)


def plot_domain_losses(
    rows: Sequence[Mapping[str, Any]], best: Mapping[str, Any], path: Path
) -> bytes:
    """Grouped bars: held-out loss per domain for the best mixtures and the baselines."""
    domains = best["domains"]
    full = sorted((r for r in rows if r["full_budget"]), key=lambda r: r["objective"])
    chosen = [r for r in full if not r["kind"].startswith("baseline:")][:BEST_BARS]
    chosen += [
        r for name in ("uniform", "natural") for r in full if r["kind"] == f"baseline:{name}"
    ]
    metric = _loss_metric(rows, domains[0])
    fig = _new_figure(max(6.0, 1.4 * len(domains) + 3), 4.0)
    ax = fig.add_subplot()
    width = 0.8 / max(len(chosen), 1)
    x = np.arange(len(domains))
    for j, r in enumerate(chosen):
        heights = [r["metrics"].get(f"heldout/{d}/{metric}", np.nan) for d in domains]
        label = (
            r["kind"].removeprefix("baseline:")
            if r["kind"].startswith("baseline:")
            else (f"#{r['number']} {r['kind']}")
        )
        ax.bar(x + (j - (len(chosen) - 1) / 2) * width, heights, width, label=label)
    values = [r["metrics"].get(f"heldout/{d}/{metric}", np.nan) for r in chosen for d in domains]
    finite = [v for v in values if np.isfinite(v)]
    if finite:
        spread = max(finite) - min(finite) or 1.0
        ax.set_ylim(min(finite) - 0.2 * spread, max(finite) + 0.1 * spread)
    ax.set_xticks(x, domains)
    ax.set_ylabel(f"held-out {metric}")
    ax.legend(fontsize=8)
    return _png(fig, path)


def plot_top_weights(rows: Sequence[Mapping[str, Any]], domains: list[str], path: Path) -> bytes:
    """Stacked merge weights of the best full-budget trials, best on the left."""
    top = sorted((r for r in rows if r["full_budget"]), key=lambda r: r["objective"])[:TOP_TRIALS]
    fig = _new_figure()
    ax = fig.add_subplot()
    x = np.arange(len(top))
    bottom = np.zeros(len(top))
    for d in domains:
        heights = np.array([r["merge_weights"][d] for r in top])
        ax.bar(x, heights, 0.7, bottom=bottom, label=d)
        bottom += heights
    ax.set_xticks(x, [f"#{r['number']}" for r in top], rotation=45, fontsize=8)
    ax.set_ylabel("merge weight")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper right")
    return _png(fig, path)


def plot_ternary(rows: Sequence[Mapping[str, Any]], domains: list[str], path: Path) -> bytes:
    """Objective over the 3-domain simplex of merge weights, interpolated between trials."""
    from matplotlib.tri import Triangulation

    full = [r for r in rows if r["full_budget"]]
    w = np.array([[r["merge_weights"][d] for d in domains] for r in full])
    values = np.array([r["objective"] for r in full], dtype=float)
    values = np.minimum(values, _clip_top(values))
    x = w[:, 1] + 0.5 * w[:, 2]
    y = np.sqrt(3) / 2 * w[:, 2]
    fig = _new_figure(5.5, 5.0)
    ax = fig.add_subplot()
    points = np.unique(np.round(np.c_[x, y], 9), axis=0)
    if len(points) >= 3 and np.linalg.matrix_rank(points - points.mean(axis=0)) == 2:
        _, keep = np.unique(np.round(np.c_[x, y], 9), axis=0, return_index=True)
        mesh = ax.tricontourf(Triangulation(x[keep], y[keep]), values[keep], levels=14)
        fig.colorbar(mesh, ax=ax, label="objective (clipped at 90th percentile)")
    ax.scatter(x, y, c="white", edgecolors="black", s=14, linewidths=0.5)
    i = int(np.argmin(values))
    ax.scatter([x[i]], [y[i]], marker="*", s=180, c="red", edgecolors="black", label="best")
    ax.plot([0, 1, 0.5, 0], [0, 0, np.sqrt(3) / 2, 0], color="black", lw=1)
    for (cx, cy), name in zip([(0, 0), (1, 0), (0.5, np.sqrt(3) / 2)], domains, strict=True):
        ax.annotate(
            name,
            (cx, cy),
            textcoords="offset points",
            xytext=(0, -12 if cy == 0 else 6),
            ha="center",
        )
    ax.set_aspect("equal")
    ax.axis("off")
    ax.legend(fontsize=8, loc="upper right")
    return _png(fig, path)


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _sections(
    rows: list[dict[str, Any]], best: dict[str, Any], run: dict[str, Any], sentence: str
) -> list[tuple[str, Any]]:
    """The report as blocks: ("h2", text), ("p", text), ("table", (header, rows)), ("img", name)."""
    domains = best["domains"]
    spec = best.get("objective_spec", {})
    blocks: list[tuple[str, Any]] = [("p", f"**{sentence}**")]
    if not best["feasible"]:
        blocks.append(("p", "No scored mixture satisfies the objective's constraints."))
    config = run.get("config", {})
    blocks.append(
        (
            "p",
            f"Objective `{spec.get('name', '?')}` (lower is better) over {len(domains)} domains "
            f"({', '.join(domains)}); {len(rows)} trials"
            + (f", sampler `{config['sampler']}`" if "sampler" in config else "")
            + f". Best: trial #{best['number']} ({best['kind']}), objective "
            f"{best['objective']:.4f}" + ("" if best["feasible"] else " (infeasible)") + ".",
        )
    )

    blocks.append(("h2", "Best mixture against the baselines"))
    metric = _loss_metric(rows, domains[0])
    header = ["mixture", "objective"] + [f"{d} {metric}" for d in domains]
    by_number = {r["number"]: r for r in rows}
    table = [
        ["best #" + str(best["number"]), _fmt(best["objective"])]
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

    blocks.append(("h2", "Objective over trials"))
    blocks.append(("img", "objective_over_trials.png"))

    blocks.append(("h2", "Top trials"))
    top = sorted((r for r in rows if r["full_budget"]), key=lambda r: r["objective"])[:TOP_TRIALS]
    blocks.append(
        (
            "table",
            (
                ["trial", "kind", "worker", "objective", "feasible"] + domains,
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
        blocks.append(("h2", "Objective over the simplex"))
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
        blocks.append(("h2", "Surrogate"))
        blocks.append(
            (
                "p",
                f"Averaged the top {surrogate['top_k']} of {surrogate['candidates']} simulated "
                f"mixtures; predicted objective {surrogate['predicted_objective']:.4f}, scored "
                f"{surrogate['objective']:.4f} (trial #{surrogate['number']}).",
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
    sentence, beats = verdict(best)
    images = {
        "objective_over_trials.png": plot_objective(rows, run_dir / "objective_over_trials.png"),
        "domain_losses.png": plot_domain_losses(rows, best, run_dir / "domain_losses.png"),
        "top_weights.png": plot_top_weights(rows, domains, run_dir / "top_weights.png"),
    }
    if len(domains) == 3:
        images["ternary.png"] = plot_ternary(rows, domains, run_dir / "ternary.png")
    title = f"Mixture search: {run_dir.name}"
    blocks = _sections(rows, best, run, sentence)
    markdown, page = run_dir / "report.md", run_dir / "report.html"
    write_atomic(markdown, render_markdown(title, blocks))
    write_atomic(page, render_html(title, blocks, images))
    return Report(markdown, page, [run_dir / name for name in images], beats)
