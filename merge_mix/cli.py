"""The `merge-mix` command line. Each command parses its options, calls one stage
function and prints a summary; the work lives in the stage modules."""

from __future__ import annotations

import errno
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


@pool_group.command("add-target")
@click.argument("pool", type=click.Path(file_okay=False, path_type=Path))
@click.argument("name")
@click.option(
    "--source",
    "sources",
    multiple=True,
    required=True,
    help="Where the target set's documents come from, as KIND:LOCATION (files:'docs/**/*.md',"
    " jsonl:data.jsonl, builtin:prose, ...; a bare glob is files:). Repeatable.",
)
@click.option("--text-field", default="text", show_default=True, help="Text field of data files.")
@click.option("--max-bytes", type=int, default=None, help="Cap on the target set's text.")
def pool_add_target(pool: Path, name: str, sources, text_field: str, max_bytes) -> None:
    """Add the evaluation-only target set NAME to the built POOL: read its sources, drop
    what the training data holds (exact and near duplicates), split it into search/test by
    document and tokenize it with the pool's tokenizer. Nothing is trained on it; searches
    can minimise its loss (--objective target-set:NAME)."""
    from merge_mix.config import SOURCE_KINDS, DomainSpec, parse_source
    from merge_mix.targets import add_target

    specs = []
    for i, raw in enumerate(sources):
        kind, sep, location = raw.partition(":")
        entry = {kind: location} if sep and kind in SOURCE_KINDS else {"files": raw}
        if next(iter(entry)) != "builtin":
            entry["text_field"] = text_field
        specs.append(parse_source(entry, f"--source[{i}]", Path.cwd()))
    target = DomainSpec(name=name, sources=tuple(specs), max_bytes=max_bytes)
    entry = add_target(pool, target)
    counts = ", ".join(
        f"{s} {entry[s]['documents']} docs/{entry[s]['tokens']:,} tokens"
        for s in ("search", "test")
    )
    click.echo(f"target set {name!r} added to {pool}: {counts}")


@pool_group.command("import")
@click.argument("pool", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The HF model directory (config.json, *.safetensors) trained elsewhere.",
)
@click.option(
    "--domain", default=None, help="The component's domain (one of the pool spec's domains)."
)
@click.option(
    "--mixture",
    required=True,
    metavar="SPEC",
    help="The data mixture it was trained on, NAME=VALUE,... (a component's must be its "
    "recipe's; see `merge-mix plan`).",
)
@click.option("--tokens", required=True, type=click.IntRange(min=1), help="Training tokens it saw.")
@click.option(
    "--as",
    "role",
    type=click.Choice(["component", "reference"]),
    default="component",
    show_default=True,
    help="A pool component, or a validation reference of --mixture at --tokens.",
)
@click.option(
    "--seed",
    type=int,
    default=None,
    help="Its data seed (recorded); for a reference, the training seed `validate` looks it "
    "up by (default 0).",
)
@click.option(
    "--wall-time-s",
    type=float,
    default=None,
    help="Its training time in seconds (recorded; validate's cost report reads it for references).",
)
@click.option(
    "--replace", is_flag=True, help="Replace a finished component (or reference) already there."
)
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Where to score it on the search split once imported ('auto': cuda, mps, cpu).",
)
def pool_import(pool, model_dir, domain, mixture, tokens, role, seed, wall_time_s, replace, device):
    """Add a component (or a validation reference) trained elsewhere to POOL.

    MODEL is checked against the pool's base (config, every tensor's name, shape and dtype,
    tokenizer), its safetensors files are copied in, hashed and recorded with their
    provenance; it then merges, searches and validates like any other component.
    """
    from merge_mix.pool import format_pool_table
    from merge_mix.pool_import import import_model

    result = import_model(
        pool, model_dir, mixture, tokens, domain=domain, role=role, seed=seed,
        replace=replace, device=device, wall_time_s=wall_time_s,
    )  # fmt: skip
    for w in result.warnings:
        click.echo(w, err=True)
    click.echo(f"imported {result.role} {result.name} into {result.path} (sha256 {result.sha256})")
    if result.role == "component":
        click.echo(format_pool_table(pool))


@main.command("plan")
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
def plan_cmd(pool_or_spec: Path, out_dir: Path, only: tuple[str, ...]) -> None:
    """Write, per component, the recipe an external trainer needs (JSON): mixture, token
    budget, shards and their index format, seed, hyperparameters, base path.

    POOL_OR_SPEC is a pool directory, or a spec whose pool exists (after
    `merge-mix train-components SPEC --prepare-only`). See docs/training.md, "Components
    trained elsewhere", and docs/examples/train_component.py.
    """
    from merge_mix.plan import write_plan

    for path in write_plan(pool_or_spec, out_dir, list(only) or None):
        click.echo(str(path))


_verify_option = click.option(
    "--verify",
    type=click.Choice(["cached", "full"]),
    default="cached",
    show_default=True,
    help="Check the base's and components' weights against their recorded sha256 before "
    "use: 'cached' skips files unchanged (size, mtime, inode) since their last check, "
    "'full' hashes every file again.",
)


def _merge_options(fn):
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
        _verify_option,
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


_extrapolate_option = click.option(
    "--extrapolate",
    is_flag=True,
    help="Allow negative weights and weights that do not sum to 1 (task arithmetic beyond "
    "the simplex).",
)


def _allow_network(ctx, param, value) -> None:
    if value:
        from merge_mix.lmeval import allow_network

        allow_network(True)


def _lmeval_options(fn):
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


def _task_options(tasks: str, include_path: Path | None) -> tuple[list[str], Path | None]:
    """Task names and where lm-eval looks for them (eval_tasks/ when tasks are given)."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if names and include_path is None:
        include_path = Path("eval_tasks")
    return names, include_path


_stack_dtype_option = click.option(
    "--stack-dtype",
    "stack_dtype",
    type=click.Choice(["fp32", "bf16"]),
    default="fp32",
    show_default=True,
    help="Dtype of the resident components (bf16 halves their memory; merges still "
    "accumulate in fp32).",
)


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


def _notice(msg: str) -> None:
    click.echo(msg, err=True)


@main.command("eval")
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
@_lmeval_options
@click.option(
    "--calibrated",
    is_flag=True,
    help="Also report calibrated metrics (needs a calibration saved by `validate`, "
    "fitted on the search split at the same --heldout-tokens).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
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
@_merge_options
@_stack_dtype_option
@_extrapolate_option
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
    extrapolate,
):
    """Score mixture proxies of POOL: per-domain held-out loss, perplexity, bits per byte,
    and lm-eval benchmark scores, on one held-out split.

    Each mixture is merged in memory (no files written) and evaluated; the pool stays
    resident between mixtures. Every mixture after the first is compared with the first
    on mean held-out loss, with a 95% paired bootstrap interval over the split's documents.
    """
    import json

    from merge_mix.compare import domain_loss, paired_bootstrap, sentence
    from merge_mix.evaluate import format_eval_table

    calibration = None
    if calibrated:
        from merge_mix.validate import load_calibration

        if extrapolate:
            raise MergeMixError("--calibrated: calibration is fitted on the simplex only")
        calibration = load_calibration(pool, keep_base=tuple(keep_base))
    task_list, include_path = _task_options(tasks, include_path)
    scorer = _scorer(
        pool,
        keep_base,
        stream,
        device,
        heldout_tokens,
        split=split,
        stack_dtype=stack_dtype,
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
        w = scorer.weights(text, as_mixture=is_mixture, extrapolate=extrapolate, notice=_notice)
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
        click.echo(json.dumps({"pool": str(pool), **measured, "mixtures": rows}, indent=2))
    else:
        click.echo(format_eval_table(rows, scorer.domains, measured))


@main.command("export")
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
@_merge_options
@_extrapolate_option
def export_cmd(pool, out, weights, mixture, force, keep_base, stream, device, verify, extrapolate):
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
        notice=_notice,
    )
    from merge_mix.merge import merger_for_pool
    from merge_mix.model import pick_device

    merger = merger_for_pool(p, pick_device(device), tuple(keep_base), stream, verify)
    path = export_proxy(p, merger, w, out, force=force)
    click.echo(
        f"wrote {path} (load with AutoModelForCausalLM.from_pretrained; "
        f"mergekit config in {path / 'mergekit.yaml'})"
    )


@main.command("make-tasks")
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
def make_tasks_cmd(pool, out, max_docs, n_choices, continuation_tokens, seed, split):
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
    click.echo(f"wrote {len(names)} tasks from the {split} split to {out}: {', '.join(names)}")


@main.command(
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
    """
    from merge_mix.lmeval import run_lm_eval_cli

    sys.exit(run_lm_eval_cli(list(args)))


@main.command("search")
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
    type=click.IntRange(min=1),
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
@_lmeval_options
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
@_merge_options
@_stack_dtype_option
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
    keep_base,
    stream,
    device,
    verify,
    stack_dtype,
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
    task_list, include_path = _task_options(tasks, include_path)
    options = dict(
        device=device,
        heldout_tokens=heldout_tokens,
        keep_base=tuple(keep_base),
        stream=stream,
        stack_dtype=stack_dtype,
        notice=_notice,
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
    click.echo(format_search_summary(summary))


@main.command("validate")
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
@_lmeval_options
@click.option("--device", default="auto", show_default=True)
@_verify_option
@click.option("--json", "as_json", is_flag=True, help="Print validation.json instead of a table.")
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
    import json

    from merge_mix.validate import format_summary, validate

    task_list, include_path = _task_options(tasks, include_path)
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
    click.echo(json.dumps(result, indent=2) if as_json else format_summary(result))


@main.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
def report_cmd(run_dir):
    """Rewrite the Markdown and HTML report of a search run directory from its trials."""
    from merge_mix.report import write_report

    report = write_report(run_dir)
    click.echo(report.headline)
    click.echo(f"wrote {report.html} and {report.markdown}")


@main.command("demo")
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
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(run_dir: Path, n_trials: int, quiet: bool) -> None:
    """The whole job on the built-in default: build the demo pool (pools/demo.yaml: four
    domains of real text from this machine's Python installation: stdlib code, C headers,
    config files, documentation and licences), search it on the search split for the
    mixture with the lowest mean held-out loss, judge the pick on the test split (the
    verdict, with a 95% interval), and write the report. Resumable: run it again after an
    interruption.
    """
    from merge_mix.config import builtin_spec_path, load_spec
    from merge_mix.objective import load_objective
    from merge_mix.pool import build_pool, format_pool_table
    from merge_mix.search.config import SearchConfig
    from merge_mix.search.gradient import GradientConfig
    from merge_mix.search.pipeline import format_search_summary, search_pool

    spec = load_spec(builtin_spec_path("demo"))
    pool = build_pool(spec, show_progress=not quiet)
    if pool is None:
        raise MergeMixError(f"{spec.output_dir}: the demo pool is not complete")
    click.echo(format_pool_table(spec.output_dir))
    click.echo("")
    # Every candidate is scored on a quarter of the search split and the best quarter on all
    # of it: the full split decides between finalists, at a third of the cost.
    config = SearchConfig(n_trials=n_trials, halving=True, eta=4, rungs=2, progress=not quiet)
    summary = search_pool(
        spec.output_dir,
        load_objective("mean_loss", pool.domains),
        config,
        run_dir,
        GradientConfig(),
        {},
    )
    click.echo(format_search_summary(summary))


if __name__ == "__main__":
    main()
