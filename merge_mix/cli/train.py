"""`merge-mix train-components` and `merge-mix plan`: build a pool, or write the recipes
an external trainer needs to build its components elsewhere."""

from __future__ import annotations

import os
from pathlib import Path

import click

from merge_mix.cli.options import echo_json, json_option, notice
from merge_mix.cli.pool import pool_summary


@click.command("train-components")
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--only",
    "only",
    multiple=True,
    metavar="DOMAIN",
    help="Train only this domain's component (repeatable). Lets several processes, GPUs or "
    "machines fill one pool directory; each takes a lock per component.",
)
@click.option(
    "--prepare-only",
    is_flag=True,
    help="Build data, tokenizer and base, then stop (run this once before fanning out "
    "components with --only, e.g. under torchrun).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Processes that read and tokenize the data  [default: the cores available].",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@json_option("the pool as JSON (as `pool show --json`; null before it has a manifest)")
def train_components(
    spec: Path,
    only: tuple[str, ...],
    prepare_only: bool,
    workers: int | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """Build the pool SPEC describes: corpora, tokenizer, shared base, one component per domain.

    Resumable: run the same command again after an interruption and it continues where it
    stopped (finished components are verified by hash and skipped; an unfinished one resumes
    from its last checkpoint). Adding a domain to SPEC trains only the new component.
    """
    from merge_mix.config import load_spec
    from merge_mix.pool import format_pool_table
    from merge_mix.pool_build import build_pool

    pool_spec = load_spec(spec)
    pool = build_pool(
        pool_spec,
        only=list(only) or None,
        prepare_only=prepare_only,
        show_progress=not quiet,
        workers=workers,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return
    built = (pool_spec.output_dir / "manifest.json").is_file()
    if as_json:
        echo_json(pool_summary(pool_spec.output_dir) if built else None)
    elif built:
        click.echo(format_pool_table(pool_spec.output_dir))
    if pool is None and not prepare_only and not only:
        say = notice if as_json else click.echo
        say("pool is not complete yet (other processes may still be training components)")


@click.command("plan")
@click.argument("pool_or_spec", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for the recipes (one <domain>.json each).",
)
@click.option(
    "--only",
    "only",
    multiple=True,
    metavar="DOMAIN",
    help="Only this domain's recipe (repeatable).",
)
@json_option("the recipes written, {domain: path}, as JSON")
def plan_cmd(pool_or_spec: Path, out_dir: Path, only: tuple[str, ...], as_json: bool) -> None:
    """Write, per component, the recipe an external trainer needs (JSON): mixture, token
    budget, shards and their index format, seed, hyperparameters, base path.

    POOL_OR_SPEC is a pool directory, or a spec whose pool exists (after
    `merge-mix train-components SPEC --prepare-only`). See docs/training.md, "Components
    trained elsewhere", and docs/examples/train_component.py.
    """
    from merge_mix.plan import write_plan

    paths = write_plan(pool_or_spec, out_dir, list(only) or None)
    if as_json:
        echo_json({"out": out_dir, "recipes": {Path(p).stem: p for p in paths}})
        return
    for path in paths:
        click.echo(str(path))
