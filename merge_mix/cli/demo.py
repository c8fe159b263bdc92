"""`merge-mix demo`: the whole job on the built-in demo pool."""

from __future__ import annotations

from pathlib import Path

import click

from merge_mix.errors import MergeMixError

DEMO_OBJECTIVE = "target-set:python-docs"


@click.command("demo")
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/demo"),
    show_default=True,
    help="Where the search goes.",
)
@click.option(
    "--n-trials",
    type=click.IntRange(min=1),
    default=48,
    show_default=True,
    help="Candidate mixtures in the search (successive halving: all are scored on a quarter"
    " of the search split, the best quarter of them on all of it).",
)
@click.option(
    "--objective",
    default=DEMO_OBJECTIVE,
    show_default=True,
    help="What the search minimises: the loss on the demo's target set (Python's"
    " documentation topics, which no component trains on), or any preset or YAML file that"
    " `merge-mix search --objective` takes (e.g. mean_loss).",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(run_dir: Path, n_trials: int, objective: str, quiet: bool) -> None:
    """The whole job on the built-in default: build the demo pool (pools/demo.yaml: four
    domains of real text from this machine's Python installation: stdlib code, C headers,
    config files, documentation and licences; and a target set, Python's documentation
    topics, that no component trains on), search it on the search split for the mixture
    with the lowest loss on the target set, judge the pick on the test split (the verdict,
    with a 95% interval, per domain and for the target set), and write the report.
    Resumable: run it again after an interruption.
    """
    from merge_mix.config import builtin_spec_path, load_spec
    from merge_mix.objective import load_objective
    from merge_mix.pool import format_pool_table
    from merge_mix.pool_build import build_pool
    from merge_mix.search.config import SearchConfig
    from merge_mix.search.gradient import GradientConfig
    from merge_mix.search.pipeline import format_search_summary, search_pool

    spec = load_spec(builtin_spec_path("demo"))
    try:
        pool = build_pool(spec, show_progress=not quiet)
    except MergeMixError as e:
        if "differ" not in str(e):
            raise
        # The built-in demo spec changed under an existing demo pool (an older merge-mix).
        raise MergeMixError(
            f"{e} [{spec.output_dir} was built by an earlier merge-mix: delete it and run"
            " `merge-mix demo` again to rebuild]"
        ) from None
    if pool is None:
        raise MergeMixError(f"{spec.output_dir}: the demo pool is not complete")
    click.echo(format_pool_table(spec.output_dir))
    click.echo("")
    # Every candidate is scored on a quarter of the search split and the best quarter on all
    # of it: the full split decides between finalists, at a third of the cost.
    config = SearchConfig(n_trials=n_trials, halving=True, eta=4, rungs=2, progress=not quiet)
    summary = search_pool(
        spec.output_dir,
        load_objective(objective, pool.domains, targets=pool.targets),
        config,
        run_dir,
        GradientConfig(),
        {},
    )
    click.echo(format_search_summary(summary))
