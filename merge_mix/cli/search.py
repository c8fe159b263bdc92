"""`merge-mix search` and `merge-mix report`: search a pool for the best mixture, and
rewrite a search run's report."""

from __future__ import annotations

from pathlib import Path

import click

from merge_mix.cli.options import (
    echo_json,
    json_option,
    lmeval_options,
    merge_options,
    notice,
    stack_options,
    task_options,
)
from merge_mix.errors import MergeMixError


@click.command("search")
@click.argument("pool", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Where the study, trials.jsonl/csv, best.json and the report go. Running "
    "again with the same directory resumes.",
)
@click.option(
    "--objective",
    default="mean_loss",
    show_default=True,
    help="mean_loss, worst_loss, target:DOMAIN[:TOLERANCE], or a YAML file of terms "
    "(see docs/search.md).",
)
@click.option(
    "--sampler",
    type=click.Choice(["dirichlet", "random", "grid", "tpe", "cmaes"]),
    default="dirichlet",
    show_default=True,
    help="How mixtures are proposed.",
)
@click.option(
    "--n-trials",
    type=click.IntRange(min=0),
    default=64,
    show_default=True,
    help="Sampled mixtures this worker scores (baselines come on top; grid ignores it).",
)
@click.option(
    "--grid-step",
    type=float,
    default=0.1,
    show_default=True,
    help="Simplex grid step (grid sampler, up to 3 domains).",
)
@click.option(
    "--temperature",
    type=float,
    default=0.7,
    show_default=True,
    help="Dirichlet prior: natural mixture to this power.",
)
@click.option(
    "--train-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Planned token budget of the final training run: caps each domain's share of the "
    "effective data mixture so its data repeats at most --max-epochs times.",
)
@click.option(
    "--max-epochs",
    type=float,
    default=4.0,
    show_default=True,
    help="With --train-tokens: most repetitions of any domain's data.",
)
@click.option(
    "--cap",
    "caps",
    default=None,
    help="Caps on the effective data mixture, e.g. code=0.3,c=0.5: no proposal (sampler, "
    "surrogate, gradient) puts more of a domain's data in the mixture.",
)
@click.option(
    "--storage",
    default=None,
    help="Study storage shared by several workers: a journal file (*.jsonl, *.log) "
    "or an RDB URL such as postgresql://... Default: RUN_DIR/study.db (SQLite).",
)
@click.option(
    "--worker",
    default="main",
    show_default=True,
    help="This worker's id; each concurrent worker needs its own.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--halving",
    is_flag=True,
    help="Successive halving: score many mixtures on few tokens, promote the best.",
)
@click.option(
    "--eta",
    type=click.IntRange(min=2),
    default=3,
    show_default=True,
    help="Halving: keep 1/eta of the candidates per rung.",
)
@click.option(
    "--rungs",
    type=click.IntRange(min=2),
    default=3,
    show_default=True,
    help="Halving: number of budget levels.",
)
@click.option(
    "--halving-verify",
    is_flag=True,
    help="Halving: also score every candidate at full budget to check the pick.",
)
@click.option(
    "--surrogate/--no-surrogate",
    default=True,
    show_default=True,
    help="Fit mixing-law and non-parametric surrogates, average the top-k of 100k "
    "simulated mixtures, and score that pick.",
)
@click.option(
    "--gradient/--no-gradient",
    default=True,
    show_default=True,
    help="Also optimise the weights by gradient descent through the merged model.",
)
@click.option("--gradient-steps", type=click.IntRange(min=1), default=12, show_default=True)
@click.option(
    "--gradient-method",
    type=click.Choice(["mirror", "softmax"]),
    default="mirror",
    show_default=True,
)
@lmeval_options
@click.option(
    "--heldout-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Cap on the search split's tokens scored per domain per mixture (whole pieces). "
    "Default: every piece of the search split; halving rungs score fractions of it.",
)
@click.option(
    "--verdict/--no-verdict",
    default=True,
    show_default=True,
    help="Judge the pick, the baselines and the other picks on the test split (paired "
    "bootstrap intervals over its documents). --no-verdict for extra workers of a shared "
    "study.",
)
@click.option(
    "--calibrated",
    is_flag=True,
    help="Add calibrated metrics (from `merge-mix validate`, fitted at the same "
    "--heldout-tokens) to every full-budget trial; never to cheaper halving rungs.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@json_option(
    "the summary as JSON: the pick (best.json), the verdict, the gradient search, the "
    "surrogate and halving summaries, the report's paths"
)
@merge_options
@stack_options
def search_cmd(
    pool,
    run_dir,
    objective,
    sampler,
    n_trials,
    grid_step,
    temperature,
    train_tokens,
    max_epochs,
    caps,
    storage,
    worker,
    seed,
    halving,
    eta,
    rungs,
    halving_verify,
    surrogate,
    gradient,
    gradient_steps,
    gradient_method,
    tasks,
    include_path,
    limit,
    heldout_tokens,
    verdict,
    calibrated,
    quiet,
    as_json,
    keep_base,
    stream,
    device,
    verify,
    stack_dtype,
    stack_device,
):
    """Find the mixture of POOL's domains that minimises an objective, by scoring many
    merged proxies on the pool's search split: baselines (uniform, natural, each pure
    component), sampled mixtures, a surrogate's pick and a gradient-searched mixture; then
    judge the picks on the test split, which the search never reads, and write a report.

    The verdict says whether the pick is better than the uniform mixture, not
    distinguishable from it, or worse, with a 95% paired bootstrap interval over the test
    split's documents (also in best.json and the report).

    Resumable (same --run-dir), and scalable: several workers, one per GPU or machine,
    share one study through --storage, each with its own --worker id.
    """
    from merge_mix.merge import parse_assignment
    from merge_mix.objective import load_objective
    from merge_mix.pool import Pool
    from merge_mix.search.config import SearchConfig
    from merge_mix.search.gradient import GradientConfig
    from merge_mix.search.pipeline import format_search_summary, search_pool

    opened = Pool.open(pool)
    domains = opened.domains
    obj = load_objective(objective, domains, calibrated=calibrated, targets=opened.targets)
    config = SearchConfig(
        sampler=sampler,
        n_trials=n_trials,
        worker=worker,
        seed=seed,
        storage=storage,
        budget_tokens=heldout_tokens,
        grid_step=grid_step,
        temperature=temperature,
        train_tokens=train_tokens,
        max_epochs=max_epochs,
        caps=None if caps is None else parse_assignment(caps, "--cap"),
        halving=halving,
        eta=eta,
        rungs=rungs,
        halving_verify=halving_verify,
        surrogate=surrogate,
        progress=not quiet,
    )
    calibration = None
    if calibrated:
        from merge_mix.validate import load_calibration

        calibration = load_calibration(pool, keep_base=tuple(keep_base))
    task_list, include_path = task_options(tasks, include_path)
    options = dict(
        device=device,
        heldout_tokens=heldout_tokens,
        keep_base=tuple(keep_base),
        stream=stream,
        stack_dtype=stack_dtype,
        stack_device=stack_device,
        notice=notice,
        lmeval_tasks=task_list,
        lmeval_include=include_path,
        lmeval_limit=limit,
        calibration=calibration,
        verify=verify,
    )
    grad = GradientConfig(steps=gradient_steps, method=gradient_method) if gradient else None
    if grad is not None and stream:
        raise MergeMixError("--gradient needs resident components; add --no-gradient with --stream")
    summary = search_pool(pool, obj, config, run_dir, grad, options, judge_test=verdict)
    if as_json:
        echo_json(summary)
        return
    click.echo(format_search_summary(summary))


@click.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@json_option("the headline, the verdict and the files written as JSON")
def report_cmd(run_dir, as_json):
    """Rewrite the Markdown and HTML report of a search run directory from its trials."""
    from merge_mix.report import write_report

    report = write_report(run_dir)
    if as_json:
        echo_json(
            {
                "run_dir": run_dir,
                "headline": report.headline,
                "verdict": report.verdict,
                "beats_uniform": report.beats_uniform,
                "html": report.html,
                "markdown": report.markdown,
                "plots": report.plots,
            }
        )
        return
    click.echo(report.headline)
    click.echo(f"wrote {report.html} and {report.markdown}")
