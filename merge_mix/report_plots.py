"""The plots of a search report (`merge_mix.report`): matplotlib figures on the Agg canvas.

Each `figure_*` function returns a `matplotlib.figure.Figure` (never pyplot, so nothing
global is touched) and `save_png` writes it. Every axis names its unit: nats/token,
bits/byte, merge weight, trial number; categorical axes (domain, comparison) say what
their categories are. Plots of the test split show paired bootstrap intervals; plots of
the search split say so, since the pick was selected on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from merge_mix.artifacts import write_atomic

TOP_TRIALS = 10
BEST_BARS = 3
SEARCH_SPLIT = "search split"
VERDICT_COLOURS = {"better": "tab:green", "not distinguishable": "tab:gray", "worse": "tab:red"}
METRIC_UNITS = {"loss": "nats/token", "bpb": "bits/byte", "ppl": "perplexity, exp(nats/token)"}


def comparison_sides(name: str) -> tuple[str, str]:
    """(first, other) of a verdict comparison key: "natural" is the pick vs natural,
    "natural vs uniform" is natural vs uniform."""
    if " vs " in name:
        first, other = name.split(" vs ", 1)
        return first, other
    return "pick", name


def gain_interval(c: Mapping[str, Any]) -> tuple[float, float, float]:
    """(gain, lo, hi) of a verdict comparison: how much lower the first side's value is, the
    sign the verdict sentences use (`merge_mix.compare.sentence`)."""
    # compare's delta is first - other (lower is better); a gain is other - first.
    return -c["delta"], -c["hi"], -c["lo"]


def loss_metric(rows: Sequence[Mapping[str, Any]], domain: str) -> str:
    """The per-domain metric the trials carry: loss, else bpb, else ppl."""
    for metric in ("loss", "bpb", "ppl"):
        if f"heldout/{domain}/{metric}" in rows[0]["metrics"]:
            return metric
    return "loss"


def _new_figure(width: float = 7.0, height: float = 4.0) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def save_png(fig: Any, path: Path) -> bytes:
    """Write `fig` as a PNG to `path` (atomically) and return the bytes."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")  # long axis labels stay whole
    data = buffer.getvalue()
    write_atomic(path, data)
    return data


def _clip_top(values: np.ndarray) -> float:
    # Penalised (infeasible) trials can sit orders of magnitude above the rest.
    return float(np.quantile(values, 0.9)) if len(values) > 5 else float(values.max())


def figure_comparisons(test: Mapping[str, Any]) -> Any:
    """Forest plot of the verdict: every test-split comparison's gain with its interval."""
    names = list(test["comparisons"])
    fig = _new_figure(7.5, 1.6 + 0.45 * len(names))
    ax = fig.add_subplot()
    y = np.arange(len(names))[::-1]
    seen = set()
    for yi, name in zip(y, names, strict=True):
        c = test["comparisons"][name]
        gain, lo, hi = gain_interval(c)
        colour = VERDICT_COLOURS.get(c["verdict"], "black")
        label = None if c["verdict"] in seen else c["verdict"]
        seen.add(c["verdict"])
        ax.errorbar(
            [gain],
            [yi],
            xerr=[[gain - lo], [hi - gain]],
            fmt="o",
            color=colour,
            capsize=4,
            markersize=7 if name == "uniform" else 5,
            label=label,
        )
    ax.axvline(0.0, color="black", lw=1)
    ax.set_yticks(y, [f"{a} vs {b}" for a, b in (comparison_sides(n) for n in names)])
    confidence = test["comparisons"]["uniform"]["confidence"]
    ax.set_xlabel(
        f"objective gain over the other mixture ({test['unit']}), test split, "
        f"{confidence:.0%} interval\n> 0: the first is better; < 0: the other is"
    )
    ax.set_ylabel("comparison (first vs other)")
    ax.legend(fontsize=8, loc="best")
    return fig


def figure_test_domains(test: Mapping[str, Any]) -> Any:
    """Per domain (and target set) on the test split: the pick's and uniform's loss, and the
    pick's gain over uniform with its paired interval."""
    per = test["per_domain_loss"]
    domains = list(per)
    x = np.arange(len(domains))
    fig = _new_figure(max(7.0, 1.6 * len(domains) + 4), 4.0)
    left, right = fig.subplots(1, 2)
    left.plot(x - 0.08, [per[d]["pick"] for d in domains], "o", label="pick")
    left.plot(x + 0.08, [per[d]["uniform"] for d in domains], "s", label="uniform")
    left.set_xticks(x, domains)
    left.set_xlim(-0.5, len(domains) - 0.5)
    left.set_xlabel("domain or target set")
    left.set_ylabel("held-out loss (nats/token), test split")
    left.legend(fontsize=8)
    confidence = next(iter(per.values()))["confidence"] if per else 0.95
    for xi, d in zip(x, domains, strict=True):
        gain, lo, hi = gain_interval(per[d])
        right.errorbar(
            [xi],
            [gain],
            yerr=[[gain - lo], [hi - gain]],
            fmt="o",
            capsize=5,
            color=VERDICT_COLOURS.get(per[d]["verdict"], "black"),
        )
    right.axhline(0.0, color="black", lw=1)
    right.set_xticks(x, domains)
    right.set_xlim(-0.5, len(domains) - 0.5)
    right.set_xlabel("domain or target set")
    right.set_ylabel(
        f"loss gain over uniform (nats/token),\ntest split, {confidence:.0%} interval; > 0: pick better"
    )
    return fig


def figure_objective(rows: Sequence[Mapping[str, Any]], unit: str) -> Any:
    """Objective per trial on the search split, coloured by what proposed it, with the
    best-so-far line."""
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
    ax.set_xlabel("trial number")
    ax.set_ylabel(f"objective ({unit}), {SEARCH_SPLIT}\n(lower is better)")
    ax.legend(fontsize=8)
    return fig


def figure_domain_losses(rows: Sequence[Mapping[str, Any]], best: Mapping[str, Any]) -> Any:
    """Grouped bars: search-split held-out loss per domain for the best mixtures and the
    baselines."""
    domains = best["domains"]
    full = sorted((r for r in rows if r["full_budget"]), key=lambda r: r["objective"])
    chosen = [r for r in full if not r["kind"].startswith("baseline:")][:BEST_BARS]
    chosen += [
        r for name in ("uniform", "natural") for r in full if r["kind"] == f"baseline:{name}"
    ]
    metric = loss_metric(rows, domains[0])
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
    ax.set_xlabel("domain")
    ax.set_ylabel(f"held-out {metric} ({METRIC_UNITS[metric]}), {SEARCH_SPLIT}")
    ax.legend(fontsize=8)
    return fig


def figure_top_weights(rows: Sequence[Mapping[str, Any]], domains: list[str]) -> Any:
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
    ax.set_xlabel(f"trial number (best objective on the {SEARCH_SPLIT} on the left)")
    ax.set_ylabel("merge weight (fraction, sums to 1)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def figure_ternary(rows: Sequence[Mapping[str, Any]], domains: list[str], unit: str) -> Any:
    """Search-split objective over the 3-domain simplex of merge weights, interpolated
    between trials."""
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
        fig.colorbar(
            mesh,
            ax=ax,
            label=f"objective ({unit}), {SEARCH_SPLIT}\n(clipped at its 90th percentile)",
        )
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
    fig.suptitle(
        "merge weights on the simplex: each corner is all weight on its domain", fontsize=9
    )
    ax.set_xlim(-0.12, 1.12)
    ax.set_ylim(-0.08, np.sqrt(3) / 2 + 0.08)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.legend(fontsize=8, loc="upper right")
    return fig
