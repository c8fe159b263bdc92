"""The `merge-mix` command line. Each command parses its options, calls one stage
function and prints a summary; the work lives in the stage modules."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from merge_mix import __version__
from merge_mix.errors import MergeMixError

# Nothing is ever fetched from a hub: make transformers/datasets/lm-eval fail fast and
# offline instead of retrying network calls.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# transformers' own bars ("Loading weights", "Writing model shards") drown ours.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class _Group(click.Group):
    """Turns a MergeMixError into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MergeMixError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="merge-mix")
def main() -> None:
    """merge-mix: find the best data mixture for language-model training by merging
    per-domain component models instead of training one model per mixture.

    \b
    Typical session:
      merge-mix train-components pools/demo.yaml   # build a pool: base + one component per domain
      merge-mix pool show pools/demo               # what is in it
    Or all of it on the built-in demo: merge-mix demo
    """


@main.command("train-components")
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
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train_components(spec: Path, only: tuple[str, ...], prepare_only: bool, quiet: bool) -> None:
    """Build the pool SPEC describes: corpora, tokenizer, shared base, one component per domain.

    Resumable: run the same command again after an interruption and it continues where it
    stopped (finished components are verified by hash and skipped; an unfinished one resumes
    from its last checkpoint). Adding a domain to SPEC trains only the new component.
    """
    from merge_mix.config import load_spec
    from merge_mix.pool import build_pool, format_pool_table

    pool_spec = load_spec(spec)
    pool = build_pool(
        pool_spec, only=list(only) or None, prepare_only=prepare_only, show_progress=not quiet
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if (pool_spec.output_dir / "manifest.json").is_file():
        click.echo(format_pool_table(pool_spec.output_dir))
    if pool is None and not prepare_only and not only:
        click.echo("pool is not complete yet (other processes may still be training components)")


@main.group("pool")
def pool_group() -> None:
    """Inspect pools."""


@pool_group.command("show")
@click.argument("pool", type=click.Path(file_okay=False, path_type=Path))
def pool_show(pool: Path) -> None:
    """Print POOL as a table: domains, tokens, epochs, held-out loss of base and components."""
    from merge_mix.pool import format_pool_table

    click.echo(format_pool_table(pool))


@main.command("demo")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(quiet: bool) -> None:
    """Build the built-in demo pool (pools/demo.yaml: real text from this machine's Python
    installation) and show it."""
    from merge_mix.config import builtin_spec_path, load_spec
    from merge_mix.pool import build_pool, format_pool_table

    spec = load_spec(builtin_spec_path("demo"))
    build_pool(spec, show_progress=not quiet)
    click.echo(format_pool_table(spec.output_dir))


if __name__ == "__main__":
    main()
