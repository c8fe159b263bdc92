"""Options and helpers shared by several `merge-mix` commands.

Options whose value becomes a field of a config dataclass (`SearchConfig`, `GradientConfig`)
or a keyword of a stage function (`validate`, `make_tasks`, `ProxyScorer`) repeat its
default here on purpose: importing those modules would make `merge-mix --help` slow.
tests/test_cli.py checks every such default against its source, and that every config field
has an option or a stated reason not to.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

verify_option = click.option(
    "--verify",
    type=click.Choice(["cached", "full"]),
    default="cached",
    show_default=True,
    help="Check the base's and components' weights against their recorded sha256 before "
    "use: 'cached' skips files unchanged (size, mtime, inode) since their last check, "
    "'full' hashes every file again.",
)


def merge_options(fn):
    """Options shared by every command that builds merged proxies from a pool."""
    options = [
        click.option(
            "--keep-base",
            "keep_base",
            multiple=True,
            metavar="PATTERN",
            help="Keep parameters whose name matches this glob at the base "
            "(repeatable), e.g. '*embed_tokens*'.",
        ),
        click.option(
            "--stream",
            is_flag=True,
            help="Read component tensors from disk at every merge instead of keeping "
            "them resident (for components that do not fit in memory).",
        ),
        click.option(
            "--device",
            default="auto",
            show_default=True,
            help="auto (CUDA, then MPS, then CPU) or a torch device.",
        ),
        verify_option,
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


extrapolate_option = click.option(
    "--extrapolate",
    is_flag=True,
    help="Allow negative weights and weights that do not sum to 1 (task arithmetic beyond "
    "the simplex).",
)


def _allow_network(ctx, param, value) -> None:
    if value:
        from merge_mix.lmeval import allow_network

        allow_network(True)


def lmeval_options(fn):
    """lm-eval task options shared by eval, search and validate."""
    options = [
        click.option(
            "--tasks",
            default="",
            metavar="T1,T2",
            help="lm-eval tasks to score too (see `merge-mix make-tasks`); a search "
            "objective with lmeval terms needs them.",
        ),
        click.option(
            "--include-path",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Where lm-eval finds --tasks (default: eval_tasks/).",
        ),
        click.option(
            "--limit",
            type=int,
            default=None,
            help="lm-eval documents per task (a multiple of the choices per item "
            "keeps multiple-choice groups whole).",
        ),
        click.option(
            "--allow-network",
            is_flag=True,
            expose_value=False,
            callback=_allow_network,
            help="Let lm-eval's built-in tasks download their datasets (default: offline,"
            " local files and the datasets cache only).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def task_options(tasks: str, include_path: Path | None) -> tuple[list[str], Path | None]:
    """Task names and where lm-eval looks for them (eval_tasks/ when tasks are given)."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if names and include_path is None:
        include_path = Path("eval_tasks")
    return names, include_path


def stack_options(fn):
    """Where and in which dtype the resident stack of components lives (eval, search)."""
    options = [
        click.option(
            "--stack-dtype",
            "stack_dtype",
            type=click.Choice(["auto", "fp32", "bf16"]),
            default="auto",
            show_default=True,
            help="Dtype of the resident components: bf16 halves their memory (merges still "
            "accumulate in fp32); auto is bf16 when the pool's weight files are bf16, else fp32.",
        ),
        click.option(
            "--stack-device",
            "stack_device",
            default="auto",
            show_default=True,
            help="Where the resident components live: auto puts them on the scoring device "
            "when they fit there, else in host memory; or a torch device.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def json_option(what: str = "one JSON document instead of the text summary"):
    """`--json`: stdout carries exactly one JSON document; progress and notes go to stderr."""
    return click.option(
        "--json", "as_json", is_flag=True, help=f"Print {what}; progress and notes go to stderr."
    )


def _plain(value: Any) -> Any:
    """numpy numbers and arrays, paths and tuples as JSON values."""
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def echo_json(document: Any) -> None:
    """Print `document` as the command's one JSON document on stdout."""
    click.echo(json.dumps(document, indent=2, default=_plain))


def notice(msg: str) -> None:
    """A note for the user that is not a result: stderr, so stdout stays the result."""
    click.echo(msg, err=True)
