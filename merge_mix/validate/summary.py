"""What a validation found, in words and in a compact table: the fidelity rows shared by the
report and the terminal, the plain sentences on where fidelity is weak, and `format_summary`
(what `merge-mix validate` prints).

Regrets and gains are shown with their paired 95% interval over test documents, and marked
``*`` when they are below the seed-noise floor (`merge_mix.validate.intervals`), which has
its own column."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from merge_mix.validate.metrics import FIDELITY_HOLDS, MEAN_TARGET, OBJECTIVE_TARGET, WORST_TARGET

WEAK_CI = 0.5
"""A Spearman interval reaching below this is called too uncertain to rely on."""
REGRET_TOLERANCE = 0.01
"""Relative regret above which the proxy's pick is called a miss (the issue's 1% goal)."""


def target_name(target: str) -> str:
    """How a target reads in tables: the domain, "mean loss", "worst domain", "objective", or
    an lm-eval metric as ``<task>/<metric>``."""
    if target == MEAN_TARGET:
        return "mean loss"
    if target == WORST_TARGET:
        return "worst domain"
    if target == OBJECTIVE_TARGET:
        return "objective"
    if target.startswith("lmeval/"):
        return target.removeprefix("lmeval/")
    if target.startswith("target/"):  # a target set: target/<name>/loss
        return "target set " + target.split("/")[1]
    return target.split("/")[1]


def num(v: float | None, fmt: str = ".2f") -> str:
    return "n/a" if v is None else format(v, fmt)


def ci(c: Mapping[str, Any]) -> str:
    if c.get("value") is None:
        return "n/a"
    return f"{c['value']:.2f} [{num(c['low'])}, {num(c['high'])}]"


def amount(v: float | None, sign: bool = False) -> str:
    """A loss-scale difference with 4 decimals; large ones (word perplexities) in 4 digits."""
    if v is None:
        return "n/a"
    return format(v, ("+" if sign else "") + (".4f" if abs(v) < 1000 else ".4g"))


BELOW_FLOOR = "*"
"""The mark of a regret or gain below the seed-noise floor."""


def with_interval(v: float | None, c: Mapping[str, Any] | None, below: bool | None) -> str:
    """A regret or gain, its interval when it has one, and the below-floor mark."""
    text = amount(v, sign=True)
    if c is not None:
        text += f" [{amount(c['low'], sign=True)}, {amount(c['high'], sign=True)}]"
    return text + (BELOW_FLOOR if below else "")


def _gain(entry: Mapping[str, Any], name: str) -> str:
    g = entry["baselines"].get(name)
    if g is None:
        return "n/a"
    return with_interval(g["gain"], g.get("interval"), g.get("below_seed_floor"))


def _regret(entry: Mapping[str, Any]) -> str:
    r = entry["regret"]
    return with_interval(r["absolute"], r.get("interval"), r.get("below_seed_floor"))


def below_floor_points(result: Mapping[str, Any]) -> list[str]:
    """One sentence per raw target whose regret or gains are below the seed-noise floor."""
    out = []
    for t in result["targets"]:
        e = result["fidelity"]["raw"]["targets"][t]
        what = ["the regret"] if e["regret"].get("below_seed_floor") else []
        what += [
            f"the gain over {name}"
            for name, g in e["baselines"].items()
            if g.get("below_seed_floor")
        ]
        if what:
            out.append(
                f"{target_name(t)}: {', '.join(what)} of the proxy's pick"
                f" ({e['regret']['pick']}) {'is' if len(what) == 1 else 'are'} below the"
                f" seed-noise floor ({amount(e['seed_floor'])}): retraining with another seed"
                " could change it."
            )
    return out


def floor_line(result: Mapping[str, Any]) -> str:
    """The seed-noise floor of every target, and what it was measured from, in one line."""
    floor = result.get("seed_floor") or {}
    per = floor.get("targets", {})
    kinds = sorted({(e["kind"], e["mixture"]) for v in per.values() for e in v["evidence"]})
    if not kinds:
        return "seed-noise floor: not measured (validate --seeds 2 or more)"
    sources = ", ".join(
        f"{m} (extra seed)" if k == "seed" else f"{m} vs its component" for k, m in kinds
    )
    values = ", ".join(f"{target_name(t)} {amount(v['floor'])}" for t, v in per.items())
    return f"seed-noise floor on the {floor['split']} split, from {sources}: {values}"


def _raw_entries(result: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(target, raw fidelity entry) for the loss targets, the objective and the benchmarks."""
    out = [(t, result["fidelity"]["raw"]["targets"][t]) for t in result["targets"]]
    bench = result["fidelity"].get("benchmarks")
    if bench:
        out += [(t, bench["targets"][t]) for t in result.get("benchmark_targets", [])]
    return out


def weak_points(result: Mapping[str, Any]) -> list[str]:
    """Plain sentences on where raw fidelity is weak, and what calibration does about it."""
    out = []
    for t, e in _raw_entries(result):
        name = target_name(t)
        rho = e["spearman"]
        if rho["value"] is None:
            out.append(f"{name}: Spearman is undefined ({rho['reason']}).")
        elif rho["value"] < FIDELITY_HOLDS:
            out.append(f"{name}: proxies rank weakly, Spearman {ci(rho)}.")
        elif rho["low"] is not None and rho["low"] < WEAK_CI:
            out.append(
                f"{name}: Spearman {rho['value']:.2f}, but its 95% interval reaches down to"
                f" {rho['low']:.2f} with {rho['n']} references: too few to rely on."
            )
        top = e["top_spearman"]
        if top["value"] is not None and top["value"] < WEAK_CI:
            out.append(
                f"{name}: among the best quarter of references the proxies barely tell"
                f" mixtures apart (Spearman {top['value']:.2f})."
            )
        res = e.get("resolution")
        if res is not None and not res["resolved"]:
            out.append(
                f"{name}: the references' real scores span only {res['real_spread']:.3f}, less"
                f" than 4 standard errors of one score ({res['standard_error']:.3f} on"
                f" {res['items']} items), about what item sampling alone could spread them by:"
                " give the benchmark more items (make-tasks --max-docs) before reading its ranks."
            )
        rel = e["regret"]["relative"]
        if rel is not None and rel > REGRET_TOLERANCE and not e["regret"].get("below_seed_floor"):
            out.append(
                f"{name}: the proxy's pick ({e['regret']['pick']}) is {rel:.1%} worse than the"
                f" best reference ({e['regret']['best']})."
            )
    bench = result["fidelity"].get("benchmarks")
    if bench and bench["macro"]:
        rho = bench["macro"]["spearman"]
        if rho["value"] is not None and rho["value"] < FIDELITY_HOLDS:
            out.append(
                f"Benchmarks: proxies rank weakly on lm-eval metrics, macro Spearman {ci(rho)}."
            )
    verdict = result["verdict"]
    raw_mean, cal_mean = verdict["mean_loss_spearman"], verdict["mean_loss_spearman_calibrated"]
    if raw_mean is not None and cal_mean is not None:
        if cal_mean > raw_mean + 0.05:
            out.append(
                f"Calibration helps: leave-one-out Spearman on the mean loss rises from"
                f" {raw_mean:.2f} to {cal_mean:.2f}."
            )
        elif cal_mean < raw_mean - 0.05:
            out.append(
                f"Calibration hurts here: leave-one-out Spearman on the mean loss falls from"
                f" {raw_mean:.2f} to {cal_mean:.2f}; do not use --calibrated with this pool."
            )
    raw_t, cal_t = result["fidelity"]["raw"]["targets"], result["fidelity"]["calibrated"]["targets"]
    worse = []
    for t in result["targets"]:
        before, after = raw_t[t]["spearman"]["value"], cal_t[t]["spearman"]["value"]
        if t != MEAN_TARGET and before is not None and after is not None and after < before - 0.05:
            worse.append(f"{target_name(t)} {before:.2f} -> {after:.2f}")
    if worse:
        out.append(
            "Calibration lowers the leave-one-out Spearman of " + ", ".join(worse) + ": its"
            " gap models overfit these references there; read those targets' raw proxies."
        )
    return out


def fidelity_rows(
    table: Mapping[str, Any], targets: list[str], macro_label: str = "macro (domains)"
) -> list[list[str]]:
    rows = []
    for t in targets:
        e = table["targets"][t]
        r = e["regret"]
        rows.append(
            [
                target_name(t),
                ci(e["spearman"]),
                ci(e["kendall"]),
                ci(e["pearson"]),
                num(e["top_spearman"]["value"]),
                _regret(e),
                num(None if r["relative"] is None else 100 * r["relative"], ".2f") + "%",
                r["pick"],
                _gain(e, "uniform"),
                _gain(e, "natural"),
                amount(e.get("seed_floor")),
            ]
        )
    macro = table.get("macro")
    if macro:
        rows.append(
            [
                macro_label,
                ci(macro["spearman"]),
                num(macro["kendall"]),
                num(macro["pearson"]),
                num(macro["top_spearman"]),
                "",
                num(None if macro["regret_relative"] is None else 100 * macro["regret_relative"])
                + "%",
                "",
                "",
                "",
                "",
            ]
        )
    return rows


FIDELITY_HEADER = [
    "target",
    "Spearman [95% CI]",
    "Kendall",
    "Pearson",
    "top-25% Spearman",
    "regret",
    "regret rel",
    "proxy's pick",
    "gain vs uniform",
    "gain vs natural",
    "seed floor",
]


def format_summary(result: Mapping[str, Any]) -> str:
    """A compact text summary for the terminal: settings, fidelity tables raw and calibrated,
    drift, warnings and where the report is."""
    s, c = result["settings"], result["costs"]
    lines = [
        f"validation of pool {result['pool_name']}: {len(result['mixtures'])} mixtures,"
        f" references at {s['reference_tokens']:,} tokens"
        + (
            ""
            if s["references_at_component_budget"]
            else f" (components: {s['component_tokens']:,})"
        )
        + f"; judged on the {result['splits']['judged_on']} split"
        f" ({sum(result['splits']['test']['documents'].values()):,} documents), calibration"
        f" fitted on the {result['splits']['calibration_fitted_on']} split"
        f" ({'all' if s['heldout_tokens'] is None else format(s['heldout_tokens'], ',')}"
        " tokens per domain)",
        f"references: {c['references_trained']} trained, {c['references_reused']} reused;"
        f" per mixture {c['reference_train_s_per_mixture']:.2f} s to train vs"
        f" {c['proxy_score_s_per_mixture']:.3f} s to score a proxy",
        "component drift from base: "
        + ", ".join(f"{d} {x:.4f}" for d, x in result["drift"]["components"].items()),
        floor_line(result),
        "",
    ]
    if result.get("objective"):
        lines.insert(-1, f"objective: {result['objective']['name']} (lower is better)")
    bench = result["fidelity"].get("benchmarks")
    sides = [
        ("raw proxies", result["fidelity"]["raw"], result["targets"]),
        ("calibrated proxies (leave-one-out)", result["fidelity"]["calibrated"], result["targets"]),
    ]
    if bench:
        sides.append(
            ("lm-eval benchmarks (raw proxies)", bench, result.get("benchmark_targets", []))
        )
    width = max(16, *(len(target_name(t)) + 1 for _, _, ts in sides for t in ts))
    header = (
        f"{'target':<{width}}{'Spearman [95% CI]':<22}{'Kendall':>8}{'top25%':>8}"
        f"  {'regret [95% CI]':<28}{'rel':>7}  {'vs uniform [95% CI]':<28}{'floor':>8}"
    )
    for title, table, targets in sides:
        lines += [title, header]
        macro = "macro (benchmarks)" if table is bench else "macro (domains)"
        for row in fidelity_rows(table, targets, macro):
            name, rho, kendall, _, top, regret, rel, _, vs_uniform, _, floor = row
            lines.append(
                f"{name:<{width}}{rho:<22}{kendall.split(' ')[0]:>8}{top:>8}"
                f"  {regret:<28}{rel:>7}  {vs_uniform:<28}{floor:>8}"
            )
        lines.append("")
    lines.append(
        f"{BELOW_FLOOR} below the seed-noise floor; intervals: paired bootstrap over test"
        " documents (Spearman's: over mixtures)"
    )
    lines += below_floor_points(result)
    lines += weak_points(result)
    lines += result["warnings"]
    files = result.get("files", {})
    if files:
        lines.append(f"report: {files['report_html']}")
        if result["calibration"]["installed"]:
            lines.append(f"calibration: {result['calibration']['installed']}")
    return "\n".join(lines)
