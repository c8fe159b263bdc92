"""`merge-mix pool show | add-target | import`: inspect a pool, add a target set to it,
or add a component (or reference) trained elsewhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from merge_mix.cli.options import echo_json, json_option, notice


def pool_summary(pool_dir: Path) -> dict[str, Any]:
    """The facts of `merge-mix pool show`'s table as one JSON-ready mapping."""
    from merge_mix.pool import HELDOUT_SPLITS, Pool

    pool = Pool.open(pool_dir, allow_empty=True)
    m = pool.manifest
    problems, _ = pool.weight_problems("cached")
    domains = {}
    for d, data in m["data"].items():
        c = m["components"].get(d)
        domains[d] = {
            "train_tokens": data["train"]["tokens"],
            **{
                split: {k: data[split][k] for k in ("tokens", "documents")}
                for split in HELDOUT_SPLITS
            },
            "component": None
            if c is None
            else {
                "tokens_seen": c["tokens_seen"],
                "epochs_own": c["epochs"].get(d, 0),
                "imported": bool(c.get("imported")),
            },
        }
    members = [("base", m["base"])] + list(m["components"].items())
    return {
        "pool": m["name"],
        "path": str(pool_dir),
        "complete": m["complete"],
        "missing": list(m.get("missing") or []),
        "damaged": dict(problems),
        "members": len(pool.members()),
        "components": len(pool.domains),
        "parameters": m["model"]["parameters"],
        "general_share": m["general_share"],
        "domains": domains,
        # Loss on the search split's first training.eval_tokens tokens per domain, as in the table.
        "heldout_loss": {
            name: {d: rec["heldout"].get(d, {}).get("loss") for d in m["data"]}
            for name, rec in members
        },
    }


@click.group("pool")
def pool_group() -> None:
    """Inspect pools."""


@pool_group.command("show")
@click.argument("pool", type=click.Path(file_okay=False, path_type=Path))
@json_option()
def pool_show(pool: Path, as_json: bool) -> None:
    """Print POOL as a table: domains, tokens, epochs, held-out loss of base and components."""
    if as_json:
        echo_json(pool_summary(pool))
        return
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
@json_option("the target set's entry (documents and tokens per split) as JSON")
def pool_add_target(pool: Path, name: str, sources, text_field: str, max_bytes, as_json) -> None:
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
    if as_json:
        echo_json({"pool": str(pool), "target_set": name, **entry})
        return
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
@json_option("what was imported (role, name, path, sha256, record; the pool) as JSON")
def pool_import(
    pool, model_dir, domain, mixture, tokens, role, seed, wall_time_s, replace, device, as_json
):
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
        notice(w)
    if as_json:
        echo_json(
            {
                "role": result.role,
                "name": result.name,
                "path": result.path,
                "sha256": result.sha256,
                "record": result.record,
                "warnings": result.warnings,
                "pool": pool_summary(pool) if result.role == "component" else None,
            }
        )
        return
    click.echo(f"imported {result.role} {result.name} into {result.path} (sha256 {result.sha256})")
    if result.role == "component":
        click.echo(format_pool_table(pool))
