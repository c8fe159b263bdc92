"""Recipes for external trainers: `merge-mix plan POOL|SPEC --out DIR`.

Writes ``DIR/<domain>.json`` per component: everything a trainer outside merge-mix
(torchrun, torchtitan, litgpt, the HF Trainer) needs to train that component the way
`merge-mix train-components` would, and the `merge-mix pool import` command that brings the
result back. A recipe holds:

- ``init_from``: the pool's base (an HF directory, safetensors) and its sha256;
- ``mixture``: per-domain sampling weights, the component's training mixture
  (`merge_mix.pool.component_mixture`), and ``tokens``, its token budget;
- ``data``: per domain the training shard, ``data/<d>/train.tokens`` (a flat little-endian
  array of ``token_dtype``, every piece stored as ``BOS tokens... EOS``) and its index
  ``train.index.npy`` (int64 rows ``(start, n_tokens, n_bytes, document)``; ``start`` is the
  offset of the piece's first token after its BOS), both readable with numpy alone;
- ``sampling``: how merge-mix draws batches (each sequence's domain drawn with the mixture's
  probabilities, a window of ``seq_len + 1`` tokens starting uniformly at random in that
  domain's stream, from ``numpy.random.default_rng([seed, step, micro_step])``), and the
  ``seed`` merge-mix itself would use for this component;
- ``training``: ``seq_len``, ``batch_size`` (sequences per micro-batch over all processes),
  ``grad_accum``, ``total_steps`` (``tokens_trained`` = ``total_steps * tokens_per_step``,
  what the import declares), the AdamW settings and the learning-rate schedule of the
  spec's training section.

`docs/examples/train_component.py` trains one component from such a recipe with plain torch,
under torchrun or not. The recipe of a SPEC is that of its pool (``output_dir``), which must
exist: run ``merge-mix train-components SPEC --prepare-only`` first.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from merge_mix.artifacts import library_versions, read_json, write_json_atomic
from merge_mix.errors import MergeMixError

FORMAT = "merge-mix-recipe"
FORMAT_VERSION = 1
INDEX_COLUMNS = ("start", "n_tokens", "n_bytes", "document")


def pool_dir_of(pool_or_spec: str | Path) -> Path:
    """The pool directory of POOL, or of SPEC (its ``output_dir``)."""
    path = Path(pool_or_spec)
    if path.is_file():
        from merge_mix.config import load_spec

        spec = load_spec(path)
        if not (spec.output_dir / "manifest.json").is_file():
            raise MergeMixError(
                f"{path}: its pool {spec.output_dir} has no base yet; run `merge-mix"
                f" train-components {path} --prepare-only` first (data, tokenizer and base)"
            )
        return spec.output_dir
    return path


def component_recipe(pool_dir: str | Path, domain: str) -> dict[str, Any]:
    """The recipe of one component of the pool at `pool_dir` (see the module docstring)."""
    from merge_mix.pool import Pool, component_mixture, recorded_spec

    pool_dir = Path(pool_dir).resolve()
    pool = Pool.open(pool_dir, allow_empty=True)
    spec = recorded_spec(pool_dir)
    if domain not in spec.domain_names:
        raise MergeMixError(
            f"--only: {domain!r} is not a domain of pool {pool_dir}"
            f" (domains: {', '.join(spec.domain_names)})"
        )
    t = spec.training
    mixture = component_mixture(domain, pool.manifest["general_mixture"], spec.general_share)
    data = read_json(pool_dir / "data" / "data.json")
    tokens_per_step = t.batch_size * t.grad_accum * spec.model.seq_len
    total_steps = max(1, math.ceil(t.component_tokens / tokens_per_step))
    shards = {}
    for d in mixture:
        shard = pool_dir / "data" / d
        shards[d] = {
            "tokens": str(shard / "train.tokens"),
            "index": str(shard / "train.index.npy"),
            "train_tokens": data["domains"][d]["train"]["tokens"],
            "stream_tokens": data["domains"][d]["train"]["stream_tokens"],
            "pieces": data["domains"][d]["train"]["pieces"],
        }
    mix_text = ",".join(f"{d}={p:.6g}" for d, p in mixture.items())
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "pool": str(pool_dir),
        "pool_name": pool.name,
        "role": "component",
        "domain": domain,
        "init_from": str(pool.base_dir),
        "base_sha256": pool.manifest["base"].get("sha256"),
        "tokenizer": str(pool.tokenizer_dir),
        "mixture": {d: round(p, 12) for d, p in mixture.items()},
        "tokens": t.component_tokens,
        "seed": spec.seed * 1000 + 1 + spec.domain_names.index(domain),
        "data": {
            "token_dtype": data["token_dtype"],
            "index_columns": list(INDEX_COLUMNS),
            "bos_id": pool.bos_id,
            "eos_id": int(pool.manifest["tokenizer"]["eos_id"]),
            "shards": shards,
        },
        "sampling": (
            "per micro-batch, batch_size sequences over all processes; each sequence's domain"
            " is drawn with probability mixture[d] and its window of seq_len + 1 tokens starts"
            " uniformly in [0, len(stream) - seq_len) of that domain's train.tokens, all from"
            " numpy.random.default_rng([seed, step, micro_step]) (rng.choice over domains in"
            " recipe order, then rng.integers per sequence); rank r of N trains on rows"
            " [r * batch_size / N, (r + 1) * batch_size / N)"
        ),
        "training": {
            "seq_len": spec.model.seq_len,
            "batch_size": t.batch_size,
            "grad_accum": t.grad_accum,
            "tokens_per_step": tokens_per_step,
            "total_steps": total_steps,
            "tokens_trained": total_steps * tokens_per_step,
            "loss": "next-token cross-entropy over all seq_len positions, in fp32",
            "optimizer": {
                "name": "AdamW",
                "lr": t.lr,
                "betas": [0.9, t.beta2],
                "eps": 1e-8,
                "weight_decay": t.weight_decay,
                "weight_decay_applies_to": "parameters with 2 or more dimensions",
                "grad_clip": t.grad_clip,
            },
            "schedule": {
                "name": t.schedule,
                "lr": t.lr,
                "min_lr": t.lr * t.min_lr_ratio,
                "warmup_steps": min(t.warmup_steps, max(total_steps - 1, 0)),
                "decay_fraction": t.decay_fraction,
            },
            "precision": t.precision,
            "storage_dtype": t.storage_dtype,
        },
        "save": (
            "an HF model directory with safetensors weights in the base's dtype"
            f" ({t.storage_dtype}, training.storage_dtype; save_pretrained(...,"
            " safe_serialization=True)); the pool tokenizer files may be saved beside them"
        ),
        "import_command": (
            f"merge-mix pool import {pool_dir} --domain {domain} --model OUT_DIR"
            f" --mixture {mix_text} --tokens {total_steps * tokens_per_step}"
        ),
        "versions": library_versions(),
    }


def write_plan(
    pool_or_spec: str | Path, out_dir: str | Path, only: list[str] | None = None
) -> list[Path]:
    """Write ``<out_dir>/<domain>.json`` for each component (every spec domain, or `only`);
    return the files written."""
    from merge_mix.pool import recorded_spec

    pool_dir = pool_dir_of(pool_or_spec)
    if not (pool_dir / "manifest.json").is_file():
        from merge_mix.pool import Pool

        Pool.open(pool_dir)  # its one-line error says what is missing
    domains = list(only) if only else recorded_spec(pool_dir).domain_names
    out = Path(out_dir)
    written = []
    for d in domains:
        path = out / f"{d}.json"
        write_json_atomic(path, component_recipe(pool_dir, d))
        written.append(path)
    return written
