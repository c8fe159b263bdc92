"""`merge-mix eval | export | make-tasks | lm-eval`: score mixture proxies, write one as a
model directory, write lm-eval tasks from a pool, run lm-eval on proxies."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from merge_mix.cli.options import (
    echo_json,
    extrapolate_option,
    json_option,
    lmeval_options,
    merge_options,
    notice,
    stack_options,
    task_options,
)
from merge_mix.errors import MergeMixError


def _scorer(pool, keep_base, stream, device, heldout_tokens, **kw):
    from merge_mix.proxy import ProxyScorer

    return ProxyScorer(
        pool,
        device=device,
        heldout_tokens=heldout_tokens,
        keep_base=tuple(keep_base),
        stream=stream,
        **kw,
    )


@click.command("eval")
@click.argument("pool", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--weights",
    "weights",
    multiple=True,
    metavar="SPEC",
    help="Merge weights: NAME=VALUE,... (e.g. code=0.4,c=0.2,prose=0.4), or "
    "'uniform', 'natural', or a domain name for its pure component. Repeatable. "
    "Default: uniform, natural and every pure component.",
)
@click.option(
    "--mixture",
    "mixtures",
    multiple=True,
    metavar="SPEC",
    help="An effective data mixture instead of merge weights (converted using the "
    "pool's general_share). Repeatable.",
)
@lmeval_options
@click.option(
    "--calibrated",
    is_flag=True,
    help="Also report calibrated metrics (needs a calibration saved by `validate`, "
    "fitted on the search split at the same --heldout-tokens).",
)
@json_option("JSON instead of a table")
@click.option(
    "--split",
    type=click.Choice(["search", "test"]),
    default="search",
    show_default=True,
    help="Held-out split to score: 'search' (what searches select on) or 'test' (kept for "
    "final verdicts; choosing mixtures by it spends its independence).",
)
@click.option(
    "--heldout-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Cap on held-out tokens scored per domain (whole pieces). Default: every piece of "
    "the split.",
)
@merge_options
@stack_options
@extrapolate_option
def eval_cmd(
    pool,
    weights,
    mixtures,
    tasks,
    include_path,
    limit,
    calibrated,
    as_json,
    split,
    keep_base,
    stream,
    device,
    verify,
    heldout_tokens,
    stack_dtype,
    stack_device,
    extrapolate,
):
    """Score mixture proxies of POOL: per-domain held-out loss, perplexity, bits per byte,
    and lm-eval benchmark scores, on one held-out split.

    Each mixture is merged in memory (no files written) and evaluated; the pool stays
    resident between mixtures. Every mixture after the first is compared with the first
    on mean held-out loss, with a 95% paired bootstrap interval over the split's documents.
    """
    from merge_mix.compare import domain_loss, paired_bootstrap, sentence
    from merge_mix.evaluate import format_eval_table

    calibration = None
    if calibrated:
        from merge_mix.validate import load_calibration

        if extrapolate:
            raise MergeMixError("--calibrated: calibration is fitted on the simplex only")
        calibration = load_calibration(pool, keep_base=tuple(keep_base))
    task_list, include_path = task_options(tasks, include_path)
    scorer = _scorer(
        pool,
        keep_base,
        stream,
        device,
        heldout_tokens,
        split=split,
        stack_dtype=stack_dtype,
        stack_device=stack_device,
        lmeval_tasks=task_list,
        lmeval_include=include_path,
        lmeval_limit=limit,
        calibration=calibration,
        verify=verify,
    )
    requested = [(w, False) for w in weights] + [(m, True) for m in mixtures]
    if not requested:
        requested = [("uniform", False), ("natural", False)] + [(d, False) for d in scorer.domains]
    rows = []
    documents = []

    def mean_loss(m):
        return sum(domain_loss(d)(m) for d in scorer.domains) / len(scorer.domains)

    for text, is_mixture in requested:
        w = scorer.weights(text, as_mixture=is_mixture, extrapolate=extrapolate, notice=notice)
        metrics = scorer.score(w)
        documents.append(scorer.last_documents)
        comparison = None
        if len(documents) > 1:
            c = paired_bootstrap(documents[-1], documents[0], mean_loss).to_dict()
            comparison = {**c, "sentence": sentence(c, requested[0][0], "nats/token", split)}
        rows.append(
            {
                "name": text,
                "merge_weights": dict(zip(scorer.domains, map(float, w), strict=True)),
                "effective_mixture": dict(
                    zip(scorer.domains, map(float, scorer.effective_mixture(w)), strict=True)
                ),
                "metrics": metrics,
                "mean_loss_vs_first": comparison,
                "cost_s": round(scorer.last_cost_s, 4),
            }
        )
    measured = {
        "split": split,
        "documents": scorer.heldout.documents(heldout_tokens),
        "tokens": scorer.heldout.tokens(heldout_tokens),
    }
    if as_json:
        echo_json({"pool": str(pool), **measured, "mixtures": rows})
    else:
        click.echo(format_eval_table(rows, scorer.domains, measured))


@click.command("export")
@click.argument("pool", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--weights",
    default=None,
    metavar="SPEC",
    help="Merge weights (NAME=VALUE,..., 'uniform', 'natural' or a domain name).",
)
@click.option("--mixture", default=None, metavar="SPEC", help="An effective data mixture instead.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@merge_options
@extrapolate_option
@json_option("what was written (paths, merge weights, effective mixture, hashes) as JSON")
def export_cmd(
    pool, out, weights, mixture, force, keep_base, stream, device, verify, extrapolate, as_json
):
    """Write the mixture proxy of POOL as a Hugging Face model directory OUT (config,
    safetensors, tokenizer) plus a mergekit YAML that reproduces the merge."""
    from merge_mix.export import export_proxy
    from merge_mix.merge import resolve_weights
    from merge_mix.pool import Pool

    if (weights is None) == (mixture is None):
        raise MergeMixError("export: give exactly one of --weights or --mixture")
    p = Pool.open(pool)
    w = resolve_weights(
        mixture or weights,
        p.domains,
        natural=p.natural_mixture(),
        general_share=p.general_share,
        general=p.general_mixture(),
        as_mixture=mixture is not None,
        extrapolate=extrapolate,
        notice=notice,
    )
    from merge_mix.merge import merger_for_pool
    from merge_mix.model import pick_device

    merger = merger_for_pool(p, pick_device(device), tuple(keep_base), stream, verify)
    path = export_proxy(p, merger, w, out, force=force)
    if as_json:
        import json

        record = json.loads((path / "merge_mix_export.json").read_text())
        echo_json({"path": path, "mergekit_config": path / "mergekit.yaml", **record})
        return
    click.echo(
        f"wrote {path} (load with AutoModelForCausalLM.from_pretrained; "
        f"mergekit config in {path / 'mergekit.yaml'})"
    )


@click.command("make-tasks")
@click.argument("pool", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("eval_tasks"),
    show_default=True,
    help="Directory lm-eval's --include_path will point at.",
)
@click.option(
    "--max-docs",
    type=click.IntRange(min=1),
    default=200,
    show_default=True,
    help="Held-out documents per domain and task.",
)
@click.option(
    "--n-choices",
    type=click.IntRange(min=2),
    default=4,
    show_default=True,
    help="Options per multiple-choice item.",
)
@click.option(
    "--continuation-tokens",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Length of each multiple-choice continuation, in tokens.",
)
@click.option(
    "--split",
    type=click.Choice(["search", "test"]),
    default="search",
    show_default=True,
    help="Held-out split the items come from: 'search' for tasks a search may select on, "
    "'test' for final judgement only (use another --out: the task names are the same).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@json_option("the tasks written as JSON")
def make_tasks_cmd(pool, out, max_docs, n_choices, continuation_tokens, seed, split, as_json):
    """Write lm-evaluation-harness tasks from POOL's held-out data: per domain a rolling
    perplexity task (mm_<pool>_<domain>_ppl) and a multiple-choice continuation benchmark
    (mm_<pool>_<domain>_choice), plus the group mm_<pool>. Data paths are absolute, so the
    tasks run from any working directory."""
    from merge_mix.lmeval import make_tasks

    names = make_tasks(
        pool,
        out,
        max_docs_per_domain=max_docs,
        n_choices=n_choices,
        seed=seed,
        continuation_tokens=continuation_tokens,
        split=split,
    )
    if as_json:
        echo_json({"out": out, "split": split, "tasks": names})
        return
    click.echo(f"wrote {len(names)} tasks from the {split} split to {out}: {', '.join(names)}")


@click.command(
    "lm-eval",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def lm_eval_cmd(args):
    """Run lm-evaluation-harness with the `merge-mix` model type registered; every option
    is lm-eval's own (try `merge-mix lm-eval --help`). Example:

    \b
      merge-mix lm-eval --model merge-mix \\
        --model_args pool=pools/demo,weights=code:0.5,prose:0.5 \\
        --tasks mm_demo_code_ppl --include_path eval_tasks --batch_size 16

    Results under --output_path go to a folder named after the pool and mixture; the
    device and batch size recorded are the ones used (defaults: auto device, batch size
    16). lm-eval's own `lm_eval` command cannot load the model type (lm-eval 0.4.13 has no
    plugin mechanism; see docs/evaluation.md).
    """
    from merge_mix.lmeval import run_lm_eval_cli

    sys.exit(run_lm_eval_cli(list(args)))
