"""A validation's outputs: validation.json, references.csv, calibration.json, report.md and a
self-contained report.html.

Files written into the output directory (each atomically):
  validation.json          everything `validate` returns (format ``merge-mix-validation``)
  references.csv           one row per mixture: reference, weights, mixture, proxy/real losses
  calibration.json         the calibration fitted on these references (see proxy_calibration.py)
  report.md, report.html   the same sections; the HTML embeds its plots as base64 PNG
  scatter_*.png            proxy vs real per target (domains, mean, worst, target sets,
                           objective), raw and leave-one-out calibrated
  scatter_benchmarks.png   proxy vs real for every lm-eval metric (with --tasks)
  gap_vs_entropy.png       proxy-minus-real mean loss against the entropy of the merge weights

The report says in words where fidelity is weak. Plots use matplotlib's Agg canvas.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from merge_mix.artifacts import write_atomic, write_json_atomic
from merge_mix.report import render_html, render_markdown
from merge_mix.validate.calibration import mixture_entropy
from merge_mix.validate.metrics import FIDELITY_HOLDS, MEAN_TARGET, OBJECTIVE_TARGET
from merge_mix.validate.proxy_calibration import calibrated_key
from merge_mix.validate.summary import (
    BELOW_FLOOR,
    FIDELITY_HEADER,
    amount,
    below_floor_points,
    fidelity_rows,
    floor_line,
    num,
    target_name,
    weak_points,
    with_interval,
)


def _sections(result: Mapping[str, Any], images: list[str]) -> list[tuple[str, Any]]:
    s, v, targets = result["settings"], result["verdict"], result["targets"]
    n = len(result["mixtures"])
    budget = (
        "the components' budget"
        if s["references_at_component_budget"]
        else f"**not** the components' budget of {s['component_tokens']:,}"
    )
    heldout = "all" if s["heldout_tokens"] is None else f"{s['heldout_tokens']:,}"
    test_docs = sum(result["splits"]["test"]["documents"].values())
    blocks: list[tuple[str, Any]] = [
        (
            "p",
            f"{n} reference models, each trained from the pool's base on the data mixture its"
            f" merge weights stand for ({s['reference_tokens']:,} tokens each, {budget}), and"
            f" the merged proxies of the same weights, scored by the same evaluator on the same"
            f" held-out documents: every figure below on the test split ({test_docs:,}"
            " documents, every piece), the calibration fitted on the search split"
            f" ({heldout} tokens per domain, the searches' budget)"
            + (
                f" and lm-eval tasks {', '.join(s['lmeval_tasks'])}"
                + ("" if s["lmeval_limit"] is None else f" (first {s['lmeval_limit']} documents)")
                if s.get("lmeval_tasks")
                else ""
            )
            + ".",
        )
    ]
    if result.get("objective"):
        blocks.append(
            (
                "p",
                f"The target `objective` is the search objective `{result['objective']['name']}`"
                " (lower is better) computed from each side's metrics; its calibrated proxy"
                " replaces every loss by its leave-one-out calibrated value.",
            )
        )
    if v["holds"]:
        blocks.append(
            (
                "p",
                f"**Raw proxies rank faithfully**: macro Spearman {num(v['macro_spearman'])}, "
                f"Spearman on the mean loss {num(v['mean_loss_spearman'])} (threshold "
                f"{FIDELITY_HOLDS}).",
            )
        )
    else:
        blocks.append(
            (
                "p",
                f"**Raw proxy fidelity is weak**: macro Spearman {num(v['macro_spearman'])}, "
                f"Spearman on the mean loss {num(v['mean_loss_spearman'])} (threshold "
                f"{FIDELITY_HOLDS}); leave-one-out calibrated: "
                f"{num(v['mean_loss_spearman_calibrated'])}.",
            )
        )
    weak = below_floor_points(result) + weak_points(result)
    blocks.append(("h2", "Where fidelity is weak"))
    blocks += [("p", line) for line in weak] or [("p", "Nowhere, at this number of references.")]
    blocks += [("p", f"**{w}**") for w in result["warnings"]]

    blocks.append(("h2", "Fidelity of raw proxies"))
    blocks.append(
        (
            "p",
            "Regret (the proxy's pick against the best reference) and gains (the pick against"
            " a baseline mixture, positive when the pick is better) with their paired 95%"
            " bootstrap interval over test documents; Spearman, Kendall and Pearson with"
            f" their bootstrap over mixtures. {BELOW_FLOOR} marks a regret or gain below the"
            " seed-noise floor (last column): retraining with another seed could change it.",
        )
    )
    blocks.append(("table", (FIDELITY_HEADER, fidelity_rows(result["fidelity"]["raw"], targets))))
    blocks.append(("h2", "Fidelity of calibrated proxies (leave-one-out)"))
    blocks.append(
        (
            "p",
            "Each reference's calibrated proxy comes from a calibration fitted on all the other "
            "references, so these numbers are out of sample.",
        )
    )
    cal_rows = fidelity_rows(result["fidelity"]["calibrated"], targets)
    blocks.append(("table", (FIDELITY_HEADER, cal_rows)))
    rmse = [
        [
            target_name(t),
            f"{result['loo'][t]['raw']['rmse']:.4f}",
            f"{result['loo'][t]['calibrated']['rmse']:.4f}",
            # Target sets are calibrated leave-one-out only, not in the pool's calibration.
            result["calibration"]["fit"]["targets"].get(t, {}).get("form", "(LOO only)"),
        ]
        for t in targets
        if t in result["loo"]
    ]
    blocks.append(
        ("table", (["target", "RMSE raw", "RMSE calibrated (LOO)", "gap form (all refs)"], rmse))
    )

    blocks += _floor_blocks(result)

    bench = result["fidelity"].get("benchmarks")
    if bench:
        blocks.append(("h2", "Fidelity on lm-eval benchmarks (raw proxies)"))
        blocks.append(
            (
                "p",
                "Every metric the tasks report, its direction (higher or lower is better) taken"
                " from the task; the macro row averages over all of them. Calibration models"
                " losses only, so these proxies are raw; lm-eval items are not resampled, so"
                " these regrets and gains have no interval.",
            )
        )
        rows = fidelity_rows(bench, result["benchmark_targets"], "macro (benchmarks)")
        blocks.append(("table", (FIDELITY_HEADER, rows)))
        blocks.append(("img", "scatter_benchmarks.png"))

    blocks.append(("h2", "Proxy against real, per target"))
    blocks += [
        ("img", name)
        for name in images
        if name.startswith("scatter_") and name != "scatter_benchmarks.png"
    ]
    blocks.append(("h2", "Gap against mixture entropy"))
    blocks.append(("img", "gap_vs_entropy.png"))

    blocks.append(("h2", "Mixtures"))
    domains = result["domains"]
    rows = []
    for m in result["mixtures"]:
        p, r = m["proxy"][MEAN_TARGET], m["real"][MEAN_TARGET]
        gap = m.get("proxy_minus_real", {}).get(MEAN_TARGET)
        rows.append(
            [m["label"], m["reference"], m["status"]]
            + [f"{m['merge_weights'][d]:.3f}" for d in domains]
            + [
                f"{p:.4f}",
                f"{r:.4f}",
                with_interval(p - r, gap, None),
                f"{m['calibrated_loo'][calibrated_key(MEAN_TARGET)]:.4f}",
            ]
        )
    blocks.append(
        (
            "table",
            (
                ["mixture", "reference", "status"]
                + [f"w {d}" for d in domains]
                + ["proxy mean", "real mean", "gap [95% CI]", "calibrated (LOO)"],
                rows,
            ),
        )
    )

    drift = result["drift"]
    blocks.append(("h2", "Component drift from the base"))
    blocks.append(
        (
            "p",
            "Relative weight distance ||component - base|| / ||base||; the regime this "
            f"validation measured extends to {drift['max']:.4f}.",
        )
    )
    blocks.append(
        (
            "table",
            (["component", "drift"], [[d, f"{x:.4f}"] for d, x in drift["components"].items()]),
        )
    )
    c = result["costs"]
    blocks.append(("h2", "Cost"))
    blocks.append(
        (
            "p",
            f"{c['references_trained']} references trained in this run, {c['references_reused']} "
            f"reused. Per mixture: training a reference {c['reference_train_s_per_mixture']:.2f} s,"
            f" scoring a proxy {c['proxy_score_s_per_mixture']:.3f} s"
            f" ({c['proxy_speedup']:.0f}x cheaper). This validation took {c['total_s']:.1f} s.",
        )
    )
    return blocks


def _floor_blocks(result: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The seed-noise floor section: each target's floor and the differences it is from."""
    blocks: list[tuple[str, Any]] = [("h2", "Seed-noise floor"), ("p", floor_line(result) + ".")]
    per = (result.get("seed_floor") or {}).get("targets", {})
    rows = []
    for t, v in per.items():
        for e in v["evidence"]:
            what = (
                f"{e['mixture']}: seed {e['seeds'][0]} - seed {e['seeds'][1]}"
                if e["kind"] == "seed"
                else f"{e['mixture']} reference - component {e['component']}"
            )
            rows.append(
                [
                    target_name(t),
                    amount(v["floor"]),
                    what,
                    with_interval(e["value"], e, None),
                    e["verdict"],
                ]
            )
    if rows:
        blocks.append(
            (
                "p",
                "Two models of the same recipe that differ only by their training seed:"
                " extra seeds of a reference, and a pure-mixture reference against the"
                " pool's component of that domain (same budget and data, another seed). The"
                " floor of a target is the largest of its differences; intervals are paired"
                " over test documents.",
            )
        )
        blocks.append(
            ("table", (["target", "floor", "pair", "difference [95% CI]", "verdict"], rows))
        )
    return blocks


def _png(fig: Any, path: Path) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_atomic(path, buffer.getvalue())
    return buffer.getvalue()


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_scatter(result: Mapping[str, Any], target: str, path: Path) -> bytes:
    """Proxy (raw and leave-one-out calibrated) against real for one target, identity line."""
    ms = result["mixtures"]
    real = np.array([m["real"][target] for m in ms])
    raw = np.array([m["proxy"][target] for m in ms])
    cal = np.array([m["calibrated_loo"][calibrated_key(target)] for m in ms])
    fig = _figure(4.6, 4.2)
    ax = fig.add_subplot()
    lo = float(min(real.min(), raw.min(), cal.min()))
    hi = float(max(real.max(), raw.max(), cal.max()))
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", lw=1, label="identity")
    rho_raw = result["fidelity"]["raw"]["targets"][target]["spearman"]["value"]
    rho_cal = result["fidelity"]["calibrated"]["targets"][target]["spearman"]["value"]
    ax.scatter(real, raw, s=22, label=f"raw (Spearman {num(rho_raw)})")
    ax.scatter(real, cal, s=22, marker="x", label=f"calibrated, LOO ({num(rho_cal)})")
    if len(ms) <= 20:
        for m, x, y in zip(ms, real, raw, strict=True):
            ax.annotate(m["label"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    what = "objective" if target == OBJECTIVE_TARGET else "held-out loss"
    ax.set_xlabel(f"real {what} (reference model)")
    ax.set_ylabel(f"proxy {what} (merged)")
    ax.set_title(target_name(target))
    ax.legend(fontsize=7)
    return _png(fig, path)


def plot_benchmarks(result: Mapping[str, Any], path: Path) -> bytes:
    """Raw proxy against real for every lm-eval metric, one small panel each."""
    targets, ms = result["benchmark_targets"], result["mixtures"]
    table = result["fidelity"]["benchmarks"]["targets"]
    cols = min(4, len(targets))
    rows = -(-len(targets) // cols)
    fig = _figure(3.2 * cols, 2.9 * rows)
    for i, t in enumerate(targets):
        ax = fig.add_subplot(rows, cols, i + 1)
        real = np.array([m["real"][t] for m in ms])
        proxy = np.array([m["proxy"][t] for m in ms])
        lo, hi = float(min(real.min(), proxy.min())), float(max(real.max(), proxy.max()))
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", lw=1)
        ax.scatter(real, proxy, s=14)
        arrow = "higher" if table[t]["higher_is_better"] else "lower"
        rho = num(table[t]["spearman"]["value"])
        ax.set_title(f"{target_name(t)}\n({arrow} is better; Spearman {rho})", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.set_xlabel("real", fontsize=7)
        ax.set_ylabel("proxy", fontsize=7)
    return _png(fig, path)


def plot_gap_entropy(result: Mapping[str, Any], path: Path) -> bytes:
    """Proxy-minus-real mean loss against the entropy of the merge weights: the pattern that
    breaks aggregate rankings when spread-out mixtures are penalised."""
    ms, domains = result["mixtures"], result["domains"]
    w = np.array([[m["merge_weights"][d] for d in domains] for m in ms])
    h = mixture_entropy(w)
    real = np.array([m["real"][MEAN_TARGET] for m in ms])
    raw = np.array([m["proxy"][MEAN_TARGET] for m in ms]) - real
    cal = np.array([m["calibrated_loo"][calibrated_key(MEAN_TARGET)] for m in ms]) - real
    fig = _figure(5.5, 3.8)
    ax = fig.add_subplot()
    ax.axhline(0, color="grey", lw=1)
    ax.scatter(h, raw, s=22, label="raw proxy - real")
    ax.scatter(h, cal, s=22, marker="x", label="calibrated (LOO) - real")
    ax.set_xlabel("entropy of the merge weights (nats)")
    ax.set_ylabel("gap in mean held-out loss")
    ax.legend(fontsize=8)
    return _png(fig, path)


def _csv(result: Mapping[str, Any]) -> str:
    domains, targets = result["domains"], result["targets"]
    header = ["label", "reference", "status"]
    header += [f"merge_weights/{d}" for d in domains] + [f"effective_mixture/{d}" for d in domains]
    header += [f"proxy/{t}" for t in targets] + [f"real/{t}" for t in targets]
    header += [f"calibrated_loo/{t}" for t in targets]
    bench = result.get("benchmark_targets", [])
    header += [f"proxy/{t}" for t in bench] + [f"real/{t}" for t in bench]
    header += ["reference_train_s", "proxy_score_s"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for m in result["mixtures"]:
        writer.writerow(
            [m["label"], m["reference"], m["status"]]
            + [m["merge_weights"][d] for d in domains]
            + [m["effective_mixture"][d] for d in domains]
            + [m["proxy"][t] for t in targets]
            + [m["real"][t] for t in targets]
            + [m["calibrated_loo"][calibrated_key(t)] for t in targets]
            + [m["proxy"][t] for t in bench]
            + [m["real"][t] for t in bench]
            + [m["reference_train_s"], m["proxy_score_s"]]
        )
    return buf.getvalue()


def write_outputs(
    result: dict[str, Any],
    calibration_record: dict[str, Any],
    out_dir: Path,
    install_to: Path | None,
) -> None:
    """Write every file listed in the module docstring into `out_dir`; `install_to` (the
    pool's calibration.json) also gets the calibration. validation.json is written last."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images: dict[str, bytes] = {}
    for t in result["targets"]:
        if t.startswith("heldout/"):
            name = f"scatter_domain_{target_name(t)}.png"
        elif t.startswith("target/"):  # target/<name>/loss: a flat file name
            name = f"scatter_target_set_{t.split('/')[1]}.png"
        else:
            name = f"scatter_{t}.png"
        images[name] = plot_scatter(result, t, out_dir / name)
    if result.get("benchmark_targets"):
        images["scatter_benchmarks.png"] = plot_benchmarks(
            result, out_dir / "scatter_benchmarks.png"
        )
    images["gap_vs_entropy.png"] = plot_gap_entropy(result, out_dir / "gap_vs_entropy.png")
    result["files"] = {
        "validation": str(out_dir / "validation.json"),
        "references_csv": str(out_dir / "references.csv"),
        "calibration": str(out_dir / "calibration.json"),
        "report_md": str(out_dir / "report.md"),
        "report_html": str(out_dir / "report.html"),
        "plots": [str(out_dir / name) for name in images],
    }
    write_atomic(out_dir / "references.csv", _csv(result))
    write_json_atomic(out_dir / "calibration.json", calibration_record)
    if install_to is not None:
        write_json_atomic(install_to, calibration_record)
    title = f"Proxy fidelity: pool {result['pool_name']}"
    blocks = _sections(result, list(images))
    write_atomic(out_dir / "report.md", render_markdown(title, blocks))
    write_atomic(
        out_dir / "report.html",
        render_html(title, blocks, images, page_width="70em", image_width="48%"),
    )
    write_json_atomic(out_dir / "validation.json", result)
