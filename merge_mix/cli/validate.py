"""`merge-mix validate`: measure how faithfully a pool's merged proxies rank mixtures."""

from __future__ import annotations

from pathlib import Path

import click

from merge_mix.cli.options import (
    echo_json,
    json_option,
    lmeval_options,
    task_options,
    verify_option,
)


@click.command("validate")
@click.argument("pool", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--mixtures",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Mixtures to validate: a JSON/YAML list of {label, weights: {domain: w}} or "
    "{label, mixture: {domain: r}}. Default: uniform, natural, each pure component, "
    "then random draws.",
)
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="A search run directory: its top mixtures are validated first, and the "
    "outputs go to RUN_DIR/validation.",
)
@click.option(
    "-n",
    "--references",
    "n_references",
    type=click.IntRange(min=4),
    default=16,
    show_default=True,
    help="Size of the default mixture set.",
)
@click.option(
    "--top-picks",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="How many search picks to validate (with --run-dir).",
)
@click.option(
    "--reference-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Train references on this many tokens instead of the components' budget "
    "(cheaper, but measured against different models; the calibration is then not "
    "installed in the pool).",
)
@click.option(
    "--heldout-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Cap on the search-split tokens per domain the calibration is fitted on, for "
    "proxies and references alike (use the searches' --heldout-tokens; default: every "
    "piece, as search does); fidelity is judged on every piece of the test split.",
)
@click.option(
    "--seeds",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Training seeds of each --seed-mixtures reference: seeds 1..N-1 are trained too, "
    "and their differences from seed 0 are the seed-noise floor reported next to every "
    "regret and gain (1: no extra seeds).",
)
@click.option(
    "--seed-mixtures",
    default=None,
    metavar="LABEL,...",
    help="Mixtures that get the extra --seeds: labels of this validation's mixtures, or "
    "uniform/natural whatever their label. Default: uniform (skipped with a warning when "
    "the set has no uniform mixture).",
)
@click.option(
    "--n-boot",
    type=click.IntRange(min=100),
    default=2000,
    show_default=True,
    help="Bootstrap resamples for the confidence intervals.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed for the random mixtures and the bootstrap.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where to write the report (default POOL/validation).",
)
@click.option(
    "--keep-base",
    "keep_base",
    multiple=True,
    metavar="PATTERN",
    help="Merge with these parameters kept at the base, as in eval/search.",
)
@click.option(
    "--objective",
    default=None,
    help="Also measure fidelity on this search objective's value (mean_loss, worst_loss, "
    "target:DOMAIN[:TOLERANCE] or a YAML file, as for search). Default with --run-dir: "
    "the search's own objective.",
)
@lmeval_options
@click.option("--device", default="auto", show_default=True)
@verify_option
@json_option("validation.json instead of a table")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def validate_cmd(
    pool,
    mixtures,
    run_dir,
    n_references,
    top_picks,
    reference_tokens,
    heldout_tokens,
    n_boot,
    seed,
    out,
    keep_base,
    objective,
    tasks,
    include_path,
    limit,
    device,
    verify,
    as_json,
    quiet,
    seeds,
    seed_mixtures,
):
    """Measure how faithfully POOL's merged proxies rank mixtures: train reference models
    from the base on each mixture's effective data mixture (same budget and hyperparameters
    as the components; stored in the pool and reused), score proxies and references with
    the same evaluator, and report Spearman/Kendall/Pearson with bootstrap intervals, top-25%
    Spearman, regret and gains over the uniform and natural baselines, raw and calibrated.

    Everything is judged on the test split: regrets, gains and proxy-minus-real gaps with
    paired bootstrap intervals over test documents, next to the seed-noise floor (extra
    seeds of the --seed-mixtures references; a regret or gain below it is said so). The
    calibration is fitted on the search split.

    With --tasks, proxies and references are also scored on those lm-eval tasks and
    fidelity is reported on every benchmark metric; with --objective, on that objective.

    Fits a calibration of the proxy-minus-real gap and saves it in the pool for
    `eval --calibrated` and `search --calibrated`. Resumable: finished references are reused.
    """
    from merge_mix.validate import format_summary, validate

    task_list, include_path = task_options(tasks, include_path)
    result = validate(
        pool,
        mixtures=mixtures,
        run_dir=run_dir,
        n_references=n_references,
        seed=seed,
        heldout_tokens=heldout_tokens,
        device=device,
        keep_base=tuple(keep_base),
        n_boot=n_boot,
        show_progress=not quiet,
        out_dir=out,
        reference_tokens=reference_tokens,
        top_picks=top_picks,
        lmeval_tasks=task_list,
        lmeval_include=include_path,
        lmeval_limit=limit,
        objective=objective,
        seeds=seeds,
        seed_mixtures=None
        if seed_mixtures is None
        else [m.strip() for m in seed_mixtures.split(",") if m.strip()],
        verify=verify,
    )
    if as_json:
        echo_json(result)
    else:
        click.echo(format_summary(result))
