"""Building a pool: one shared base and one component per domain, from a spec.

`build_pool` runs the stages in order, each skipped when its artifact exists:
corpora -> tokenizer -> token shards (``data/``) -> base (``base/``) -> one component per
domain (``components/<domain>/``). Each stage's record is written last and atomically, and
``manifest.json`` is rebuilt from those records (`merge_mix.pool.write_manifest`), under a
file lock, after every stage that changes them: a pool is complete (``"complete": true``),
visibly incomplete, or has no manifest at all. See docs/pool-format.md. Reading a pool is
`merge_mix.pool`.

Several processes (GPUs, machines on a shared filesystem) can fill one pool: each takes
a per-component lock, so they split the components between them; ``--only DOMAIN``
pins a process to one component.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from merge_mix.artifacts import file_lock, library_versions, read_json, write_json_atomic
from merge_mix.config import DataSpec, PoolSpec
from merge_mix.errors import MergeMixError
from merge_mix.pool import (
    FORMAT_VERSION,
    MANIFEST,
    Pool,
    component_mixture,
    old_format_message,
    write_manifest,
)

# Sections that, once built, a spec may not change for the same pool directory.
FROZEN_SECTIONS = ("seed", "general_share", "general_mix", "data", "tokenizer", "model", "training")
# Settings of how a run executes, not of what it trains: free to differ between machines.
RUNTIME_FIELDS = {
    "training": (
        "device",
        "eval_every",
        "eval_tokens",
        "checkpoint_every",
        "parallel",
        "activation_checkpointing",
    )
}


def _log(msg: str) -> None:
    # Progress notes through logging (logger ``merge_mix.*``); the CLI shows INFO on stderr.
    logging.getLogger(__name__).info(msg)


def _general_mixture(spec: PoolSpec, data: dict, domains: list[str]) -> dict[str, float]:
    if spec.general_mix == "uniform":
        return {d: 1.0 / len(domains) for d in domains}
    tokens = {d: data["domains"][d]["train"]["tokens"] for d in domains}
    total = sum(tokens.values())
    return {d: t / total for d, t in tokens.items()}


def _sources_hash(spec: PoolSpec, domain: str) -> str:
    d = next(x for x in spec.domains if x.name == domain)
    fields = {**dataclasses.asdict(d), "sources": [s.identity() for s in d.sources]}
    blob = json.dumps(fields, sort_keys=True) + json.dumps(spec.data.identity(), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _frozen_spec(spec: PoolSpec) -> dict[str, Any]:
    full = spec.to_dict()
    frozen = {k: full[k] for k in FROZEN_SECTIONS}
    for section, names in RUNTIME_FIELDS.items():
        frozen[section] = {k: v for k, v in frozen[section].items() if k not in names}
    return frozen


def _check_output_dir(spec: PoolSpec) -> None:
    """output_dir must be absent, empty, or a pool merge-mix started (``spec.json``, or the
    ``.prepare.lock`` every build takes first): a build writes and deletes files there, so
    a user's own directory is never used."""
    out = spec.output_dir
    if out.exists() and not out.is_dir():
        raise MergeMixError(f"{spec.spec_path}: output_dir: {out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not ((out / "spec.json").is_file() or (out / ".prepare.lock").is_file()):
        raise MergeMixError(
            f"{spec.spec_path}: output_dir: {out} is not empty and is not a merge-mix pool"
            " (no spec.json); use a new or empty directory"
        )


def _check_pretrained_base(spec: PoolSpec) -> None:
    """Before any data is read: the pretrained base is a causal LM and the tokenizer's
    vocabulary fits its input embeddings."""
    from merge_mix.model import check_pretrained
    from merge_mix.tokens import load_tokenizer

    where = f"{spec.spec_path}: model.pretrained"
    config = check_pretrained(spec.model.pretrained, where)
    tok_where = f"{spec.spec_path}: tokenizer.path"
    tok_path = Path(spec.tokenizer.path or spec.model.pretrained)
    if not tok_path.is_dir():
        raise MergeMixError(f"{tok_where}: {tok_path} not found")
    try:
        n = len(load_tokenizer(tok_path))
    except MergeMixError as exc:
        raise MergeMixError(f"{tok_where}: {exc}") from None
    if n > config.vocab_size:
        raise MergeMixError(
            f"{tok_where}: {tok_path} has {n} tokens, more than the {config.vocab_size} input"
            f" embeddings of model.pretrained ({spec.model.pretrained}); use the model's own"
            " tokenizer"
        )


def _check_same_spec(spec: PoolSpec, pool_dir: Path) -> None:
    """Refuse to mix two specs in one directory; allow adding domains (growth)."""
    data_path = pool_dir / "data" / "data.json"
    if data_path.is_file():
        version = read_json(data_path).get("format_version", 1)
        if version < FORMAT_VERSION:
            raise MergeMixError(old_format_message(pool_dir, version))
    path = pool_dir / "spec.json"
    if not path.is_file():
        return
    old = read_json(path)
    new = _frozen_spec(spec)
    # Pools built before training.storage_dtype existed saved float32.
    old["frozen"].get("training", {}).setdefault("storage_dtype", "float32")
    # Pools built before data.heldout_max_bytes existed are read as having its default:
    # the cap differs from no cap only for a domain holding out over 64 MB.
    old["frozen"].get("data", {}).setdefault("heldout_max_bytes", DataSpec.heldout_max_bytes)
    for section, names in RUNTIME_FIELDS.items():
        old["frozen"][section] = {
            k: v for k, v in old["frozen"].get(section, {}).items() if k not in names
        }
    for section in FROZEN_SECTIONS:
        if old["frozen"].get(section) != new[section]:
            a, b = old["frozen"].get(section), new[section]
            detail = ""
            if isinstance(a, dict) and isinstance(b, dict):
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                if diff:
                    k = diff[0]
                    section = f"{section}.{k}"
                    detail = f" ({a.get(k)!r} in the pool, {b.get(k)!r} in the spec)"
            else:
                detail = f" ({a!r} in the pool, {b!r} in the spec)"
            raise MergeMixError(
                f"{spec.spec_path}: {section} differs from the spec pool {pool_dir} was built"
                f" with{detail}; use a new output_dir for a different spec"
            )
    removed = [d for d in old["domains"] if d not in spec.domain_names]
    if removed:
        raise MergeMixError(
            f"{spec.spec_path}: domains.{removed[0]}: in pool {pool_dir} but not in the spec"
            " (a pool only grows; use a new output_dir to drop a domain)"
        )
    for d in spec.domain_names:
        if d in old["sources"] and old["sources"][d] != _sources_hash(spec, d):
            raise MergeMixError(
                f"{spec.spec_path}: domains.{d}.sources differ from those pool {pool_dir} was"
                " built with; use a new domain name or a new output_dir"
            )


def _prepare_data(
    spec: PoolSpec, pool_dir: Path, workers: int | None = None, show_progress: bool = False
) -> dict:
    """Corpora, tokenizer and token shards for every spec domain not yet in data.json
    (`merge_mix.data.prepare`: streaming, tokenized in `workers` processes), then the
    target sets."""
    from merge_mix.data.prepare import prepare_domains
    from merge_mix.targets import prepare_targets

    data_dir = pool_dir / "data"
    data_path = data_dir / "data.json"
    data = read_json(data_path) if data_path.is_file() else {"domains": {}}
    if data["domains"] and data.get("format_version", 1) < FORMAT_VERSION:
        raise MergeMixError(old_format_message(pool_dir, data.get("format_version", 1)))
    if any(d.name not in data["domains"] for d in spec.domains):
        data = prepare_domains(spec, pool_dir, data, _sources_hash, workers, show_progress)
    return prepare_targets(spec, pool_dir, data)


def _check_budgets(spec: PoolSpec, data: dict, general: dict[str, float], base_needed: bool):
    """Refuse budgets that repeat a domain's training data more than `max_epochs` times."""
    t = spec.training
    for d in spec.domain_names:
        available = data["domains"][d]["train"]["tokens"]
        need = []
        if base_needed:
            need.append(("base", t.base_tokens * general.get(d, 0.0), "training.base_tokens"))
        for c in spec.domain_names:
            share = component_mixture(c, general, spec.general_share).get(d, 0.0)
            need.append(
                (f"component {c!r}", t.component_tokens * share, "training.component_tokens")
            )
        who, tokens, field = max(need, key=lambda x: x[1])
        epochs = tokens / max(available, 1)
        if epochs > spec.max_epochs:
            raise MergeMixError(
                f"{spec.spec_path}: {field}: {who} would see domain {d!r} {epochs:.1f} times"
                f" ({tokens:,.0f} of its {available:,} training tokens), over max_epochs"
                f" ({spec.max_epochs:g}); lower the budget, add data, or raise max_epochs"
            )


def _heldout_set(pool_dir: Path, domains: list[str], spec: PoolSpec, bos: int):
    from merge_mix.evaluate import HeldoutSet

    # Training-time monitoring and the records' losses read the search split: the test
    # split is kept for final verdicts.
    return HeldoutSet.from_pool_data(
        pool_dir / "data", domains, bos, spec.model.seq_len, spec.training.eval_tokens, "search"
    )


def _record_losses(model, heldout, device, precision) -> dict[str, dict[str, float]]:
    from merge_mix.evaluate import heldout_metrics

    metrics = heldout_metrics(model, heldout, device, precision)
    return {
        d: {m: round(metrics[f"heldout/{d}/{m}"], 6) for m in ("loss", "ppl", "bpb")}
        for d in heldout.domains
    }


def _train_member(
    spec: PoolSpec,
    pool_dir: Path,
    plan,
    data: dict,
    tokenizer,
    device,
    step_callback,
    show_progress: bool,
) -> dict:
    """Train one pool member (base or component) by `plan` (a `TrainPlan`) and save it."""
    from merge_mix.model import build_model, count_parameters, load_model
    from merge_mix.tokens import special_ids
    from merge_mix.train import commit_model, init_distributed

    rank, world = init_distributed()
    bos, eos = special_ids(tokenizer)
    if plan.init_from is None:
        model = build_model(spec.model, len(tokenizer), bos, eos, spec.seed)
    else:
        model = load_model(plan.init_from)
    model.to(device)
    heldout = _heldout_set(pool_dir, list(data["domains"]), spec, bos)
    result = plan.run(
        model,
        pool_dir / "data",
        spec.training,
        spec.model.seq_len,
        device,
        heldout=heldout,
        step_callback=step_callback,
        show_progress=show_progress,
    )
    if rank != 0:
        return {}
    out_dir = plan.out_dir
    tmp = stage_stored(model, out_dir, tokenizer, spec.training.storage_dtype)
    losses = _record_losses(model, heldout, device, spec.training.precision)
    epochs = {
        d: round(result.domain_tokens.get(d, 0) / data["domains"][d]["train"]["tokens"], 4)
        for d in plan.mixture
    }
    record = {
        "path": str(out_dir.relative_to(pool_dir)),
        "training_mixture": {d: round(p, 6) for d, p in plan.mixture.items()},
        "realised_mixture": {
            d: round(t / max(1, result.tokens), 6) for d, t in result.domain_tokens.items()
        },
        "tokens_seen": result.tokens,
        "domain_tokens": result.domain_tokens,
        "epochs": epochs,
        "steps": result.steps,
        "world_size": world,
        "heldout": losses,
        "heldout_split": "search",
        "heldout_tokens": spec.training.eval_tokens,
        "final_train_loss": round(result.final_train_loss, 6),
        "parameters": count_parameters(model),
        "seed": spec.seed,
        "wall_time_s": result.wall_time_s,
        "initialised_from": (
            None if plan.init_from is None else str(plan.init_from.relative_to(pool_dir))
        ),
        "versions": library_versions(),
        "history": result.history,
    }
    record["sha256"] = commit_model(tmp, out_dir)
    return record


def _member_plan(
    spec: PoolSpec,
    pool_dir: Path,
    name: str,
    init_from: Path | None,
    mixture: dict[str, float],
    tokens: int,
):
    """The `TrainPlan` of the base (``name`` "base") or of a domain's component: data seed
    ``seed * 1000 + k`` (k = 0 for the base, 1 + the domain's spec position otherwise),
    checkpoints in ``work/<name>``, the model in ``base`` or ``components/<name>``."""
    from merge_mix.train import TrainPlan

    k = 0 if name == "base" else 1 + spec.domain_names.index(name)
    return TrainPlan(
        label=name,
        init_from=init_from,
        mixture=mixture,
        tokens=tokens,
        seed=spec.seed * 1000 + k,
        workdir=pool_dir / "work" / name,
        out_dir=pool_dir / "base" if name == "base" else pool_dir / "components" / name,
    )


def stage_stored(model, out_dir: Path, tokenizer, storage_dtype: str = "float32") -> Path:
    """`stage_model` (a complete HF model directory, ``<out_dir>.tmp``) with the weights
    saved in `storage_dtype` (``training.storage_dtype``). The model keeps fp32 parameters
    holding the saved values (rounded to bf16 for ``bfloat16``; buffers untouched), so what
    is scored next is what was saved."""
    import torch

    from merge_mix.train import stage_model

    if storage_dtype == "float32":
        return stage_model(model, out_dir, tokenizer)
    params = list(model.parameters())  # a tied parameter once
    for p in params:
        p.data = p.data.to(torch.bfloat16)
    try:
        return stage_model(model, out_dir, tokenizer)
    finally:
        for p in params:
            p.data = p.data.to(torch.float32)


def _build_base(spec, pool_dir, data, tokenizer, general, device, step_callback, show_progress):
    from merge_mix.model import check_causal, count_parameters, load_model
    from merge_mix.tokens import special_ids
    from merge_mix.train import commit_model

    base_dir = pool_dir / "base"
    if spec.model.pretrained is not None:
        _log(f"[{spec.name}] copying pretrained base from {spec.model.pretrained}")
        model = load_model(spec.model.pretrained, device)
        where = f"{spec.spec_path}: model.pretrained"
        check_causal(model, where)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            raise MergeMixError(
                f"{spec.spec_path}: tokenizer.path: {len(tokenizer)} tokens, more than the"
                f" {model.get_input_embeddings().num_embeddings} input embeddings of"
                f" model.pretrained ({spec.model.pretrained})"
            )
        tmp = stage_stored(model, base_dir, tokenizer, spec.training.storage_dtype)
        sha256 = commit_model(tmp, base_dir)
        heldout = _heldout_set(pool_dir, list(data["domains"]), spec, special_ids(tokenizer)[0])
        record = {
            "path": "base",
            "pretrained_from": spec.model.pretrained,
            "parameters": count_parameters(model),
            "heldout": _record_losses(model, heldout, device, spec.training.precision),
            "versions": library_versions(),
        }
        record["sha256"] = sha256
    else:
        plan = _member_plan(spec, pool_dir, "base", None, general, spec.training.base_tokens)
        record = _train_member(
            spec, pool_dir, plan, data, tokenizer, device, step_callback, show_progress
        )
    return record


def _score_on_new_domains(spec, pool_dir, data, tokenizer, device) -> None:
    """Grown pools: score the base and every finished component on domains added after
    they were built, so each record holds held-out losses on every domain."""
    from merge_mix.model import load_model
    from merge_mix.tokens import special_ids

    records = [pool_dir / "base" / "base.json"]
    records += sorted((pool_dir / "components").glob("*/component.json"))
    for path in records:
        record = read_json(path)
        missing = [d for d in data["domains"] if d not in record["heldout"]]
        if not missing:
            continue
        model = load_model(path.parent, device)
        heldout = _heldout_set(pool_dir, missing, spec, special_ids(tokenizer)[0])
        record["heldout"].update(_record_losses(model, heldout, device, spec.training.precision))
        write_json_atomic(path, record)


def _verified(record_path: Path, model_dir: Path) -> bool:
    from merge_mix.model import weights_sha256

    if not record_path.is_file():
        return False
    record = read_json(record_path)
    try:
        ok = weights_sha256(model_dir) == record.get("sha256")
    except MergeMixError:
        ok = False
    if not ok and record.get("imported"):
        # Trained elsewhere: retraining here would silently replace it by another recipe.
        raise MergeMixError(
            f"{model_dir}: imported component's weights do not match their recorded sha256;"
            f" import it again with `merge-mix pool import --replace`"
            f" (from {record.get('provenance', {}).get('source', '?')})"
        )
    if not ok:
        logging.getLogger(__name__).warning(
            f"{model_dir}: weights do not match their recorded sha256; retraining"
        )
        record_path.unlink()
    return ok


def build_pool(
    spec: PoolSpec,
    only: list[str] | None = None,
    prepare_only: bool = False,
    show_progress: bool = True,
    step_callback: Callable[[str, int], None] | None = None,
    workers: int | None = None,
) -> Pool | None:
    """Build (or resume, or grow) the pool a spec describes; return it when complete.
    `workers`: processes that read and tokenize the data (default: the cores available)."""
    from merge_mix.model import pick_device
    from merge_mix.tokens import load_tokenizer, special_ids

    pool_dir = spec.output_dir
    unknown = [d for d in only or [] if d not in spec.domain_names]
    if unknown:
        raise MergeMixError(
            f"--only: {unknown[0]!r} is not a domain of {spec.spec_path}"
            f" (domains: {', '.join(spec.domain_names)})"
        )
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if len(only or []) != 1 or not (pool_dir / "base" / "base.json").is_file():
            raise MergeMixError(
                "under torchrun, train one component per launch with --only DOMAIN, after"
                " building the base with `merge-mix train-components SPEC --prepare-only`"
            )
    _check_output_dir(spec)
    pool_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(spec.training.device)
    with file_lock(pool_dir / ".prepare.lock"):
        _check_same_spec(spec, pool_dir)
        if spec.model.pretrained is not None and not (pool_dir / "base" / "base.json").is_file():
            _check_pretrained_base(spec)
        data = _prepare_data(spec, pool_dir, workers, show_progress)
        tokenizer = load_tokenizer(pool_dir / "tokenizer")
        bos, eos = special_ids(tokenizer)
        import transformers

        tok_record = {
            "path": "tokenizer",
            "vocab_size": len(tokenizer),
            "bos_id": bos,
            "eos_id": eos,
            "class": type(tokenizer).__name__,
            "sha256": hashlib.sha256(
                (pool_dir / "tokenizer" / "tokenizer.json").read_bytes()
            ).hexdigest()
            if (pool_dir / "tokenizer" / "tokenizer.json").is_file()
            else None,
            "transformers": transformers.__version__,
        }
        write_json_atomic(pool_dir / "tokenizer" / "merge_mix_tokenizer.json", tok_record)
        base_path = pool_dir / "base" / "base.json"
        if base_path.is_file() and _verified(base_path, pool_dir / "base"):
            general = read_json(base_path)["general_mixture"]
            _check_budgets(spec, data, general, base_needed=False)
            _score_on_new_domains(spec, pool_dir, data, tokenizer, device)
        else:
            general = _general_mixture(spec, data, spec.domain_names)
            _check_budgets(spec, data, general, base_needed=spec.model.pretrained is None)
            record = _build_base(
                spec, pool_dir, data, tokenizer, general, device,
                (lambda s: step_callback("base", s)) if step_callback else None, show_progress,
            )  # fmt: skip
            if not record:  # a non-zero torchrun rank
                return None
            record["general_mixture"] = general
            write_json_atomic(base_path, record)
            shutil.rmtree(pool_dir / "work" / "base", ignore_errors=True)
        write_json_atomic(
            pool_dir / "spec.json",
            {
                "frozen": _frozen_spec(spec),
                "domains": list(data["domains"]),
                "sources": {d: v["sources_hash"] for d, v in data["domains"].items()},
            },
        )
    write_manifest(spec, pool_dir)
    if prepare_only:
        return None
    for domain in only or spec.domain_names:
        comp_dir = pool_dir / "components" / domain
        record_path = comp_dir / "component.json"
        # Every torchrun rank trains the same component, so only separate launches lock.
        lock_path = pool_dir / "work" / f"{domain}.lock"
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        with contextlib.nullcontext(True) if distributed else file_lock(lock_path, False) as mine:
            if not mine:
                _log(f"[{spec.name}] component {domain!r} is being trained by another process")
                continue
            if _verified(record_path, comp_dir):
                continue
            _log(f"[{spec.name}] training component {domain!r}")
            plan = _member_plan(
                spec,
                pool_dir,
                domain,
                pool_dir / "base",
                component_mixture(domain, general, spec.general_share),
                spec.training.component_tokens,
            )
            record = _train_member(
                spec,
                pool_dir,
                plan,
                data,
                tokenizer,
                device,
                (lambda s, d=domain: step_callback(d, s)) if step_callback else None,
                show_progress,
            )
            if not record:
                continue
            record["domain"] = domain
            write_json_atomic(record_path, record)
            shutil.rmtree(pool_dir / "work" / domain, ignore_errors=True)
        write_manifest(spec, pool_dir)
    manifest = read_json(pool_dir / MANIFEST)
    return Pool(pool_dir, manifest) if manifest["complete"] else None
