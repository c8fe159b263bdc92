"""The `merge-mix` command line. Each command parses its options, calls one stage
function and prints a summary (or, with --json, one JSON document); the work lives in the
stage modules.

One module per command group: `train` (train-components, plan), `pool` (pool show,
add-target, import), `evaluate` (eval, export, make-tasks, lm-eval), `search` (search,
report), `validate`, `demo`; `options` holds the options several commands share.
Run as `merge-mix ...` or `python -m merge_mix.cli ...` (e.g. under torchrun).
"""

from __future__ import annotations

import errno
import logging
import os
import sys

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


# OS errors a user can fix (space, permissions, a read-only mount): said in one line.
_USER_ERRNOS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}


class _Group(click.Group):
    """Turns a MergeMixError, or an OSError the user can fix (disk full, permission
    denied, read-only file system), into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MergeMixError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except OSError as exc:
            if exc.errno not in _USER_ERRNOS:
                raise
            what = _USER_ERRNOS[exc.errno]
            where = exc.filename or "a file merge-mix was writing"
            hint = (
                "; free some space and run the command again (nothing half-written is kept)"
                if exc.errno in (errno.ENOSPC, errno.EDQUOT)
                else "; this command writes there: use a copy you can write to"
            )
            click.echo(f"error: {where}: {what}{hint}", err=True)
            sys.exit(2)


class _EchoHandler(logging.Handler):
    """The library's log records (`logging`, logger ``merge_mix``), INFO and up, on stderr
    through click (so a test runner's captured stderr sees them too)."""

    def emit(self, record: logging.LogRecord) -> None:
        prefix = "warning: " if record.levelno >= logging.WARNING else ""
        click.echo(prefix + self.format(record), err=True)


def _log_to_stderr() -> None:
    logger = logging.getLogger("merge_mix")
    if not any(isinstance(h, _EchoHandler) for h in logger.handlers):
        logger.addHandler(_EchoHandler())
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


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
    _log_to_stderr()


# One module per command group. They import only click at the top (each command imports its
# stage modules when it runs), so `merge-mix --help` stays instant.
from merge_mix.cli.demo import demo  # noqa: E402
from merge_mix.cli.evaluate import eval_cmd, export_cmd, lm_eval_cmd, make_tasks_cmd  # noqa: E402
from merge_mix.cli.pool import pool_group  # noqa: E402
from merge_mix.cli.search import report_cmd, search_cmd  # noqa: E402
from merge_mix.cli.train import plan_cmd, train_components  # noqa: E402
from merge_mix.cli.validate import validate_cmd  # noqa: E402

for _command in (
    train_components,
    pool_group,
    plan_cmd,
    eval_cmd,
    export_cmd,
    make_tasks_cmd,
    lm_eval_cmd,
    search_cmd,
    validate_cmd,
    report_cmd,
    demo,
):
    main.add_command(_command)
