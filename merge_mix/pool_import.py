"""Components and references trained elsewhere: `merge-mix pool import`.

A team trains components where it trains everything else (torchrun, torchtitan, litgpt, the
HF Trainer) from the recipe `merge-mix plan` writes, then brings each one into the pool::

    merge-mix pool import POOL --domain code --model trained/code \\
        --mixture code=0.6667,c=0.1667,prose=0.1667 --tokens 40960

Before anything is copied, the model directory is checked against the pool's base:

- ``config.json``: the same ``model_type`` and every other field both define equal once both
  are read by transformers (defaults filled in), except bookkeeping (`HARMLESS_CONFIG`);
- every tensor of its ``*.safetensors`` files (read from the headers, never unpickled): the
  same names, shapes and dtypes as the base's, i.e. the pool's ``training.storage_dtype``
  (a tied alias such as ``lm_head.weight`` may be present or absent); the first mismatch is
  named in a one-line error;
- its tokenizer, when it has one: the same as the pool's (``tokenizer.json`` compared as data,
  otherwise the vocabulary and the encoding of a probe text);
- the declared training mixture: for a component, the mixture its recipe gives
  (`merge_mix.pool.component_mixture`), because merge weights stand for effective mixtures
  only when every component was trained on its recipe's mixture.

The weights files are then copied byte for byte into ``components/<domain>/`` (or
``references/<id>/``) with the pool's discipline: staged in ``<dir>.tmp`` next to it with the
base's ``config.json`` and the pool tokenizer, loaded once through the pool's own loader and
scored on the search split, renamed into place, the sha256 taken, the record written last
(``imported: true`` and a ``provenance`` block), and for a component the manifest rebuilt
under the pool lock. `merge-mix train-components` skips an imported component like any
finished one and never retrains it.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge_mix.artifacts import (
    file_lock,
    library_versions,
    read_json,
    shareable,
    write_json_atomic,
)
from merge_mix.errors import MergeMixError

ROLES = ("component", "reference")
HARMLESS_CONFIG = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "_attn_implementation_autoset",
    "architectures",
}
"""Config fields that differ between identical models saved by different runs or trainers
(``architectures`` is checked separately: only when both files name one)."""
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer_config.json",
)
# tokenizer.json keys that are run-time settings, not the tokenizer.
_TOKENIZER_RUNTIME = ("truncation", "padding")
_PROBE = "def merge(pool):\n    return {'mixture': 0.25}  # Über naïve café, 2024 \u4e2d\u6587\n"
MIXTURE_TOLERANCE = 5e-3
"""Largest per-domain difference between a declared mixture and the recipe's (declared
mixtures are often typed rounded)."""


@dataclass
class ImportResult:
    """What `import_model` wrote."""

    role: str
    name: str
    """The domain of a component, the id of a reference."""
    path: Path
    sha256: str
    record: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# Checks against the pool's base


def _load_config(path: Path, where: str):
    from transformers import AutoConfig

    from merge_mix.model import quiet_transformers

    quiet_transformers()
    if not (path / "config.json").is_file():
        raise MergeMixError(f"{where}: {path} is not a model directory (no config.json)")
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise MergeMixError(f"{where}: {path}/config.json: {str(exc).splitlines()[0]}") from None


def check_config(base_dir: Path, model_dir: Path) -> None:
    """One-line error unless `model_dir`'s config describes the base's architecture."""
    base = _load_config(base_dir, "the pool's base")
    model = _load_config(model_dir, "--model")
    where = f"{model_dir}/config.json"
    if model.model_type != base.model_type:
        raise MergeMixError(
            f"{where}: model_type {model.model_type!r}, the pool's base is {base.model_type!r}"
        )
    a, b = base.to_dict(), model.to_dict()
    if (
        a.get("architectures")
        and b.get("architectures")
        and a["architectures"] != b["architectures"]
    ):
        raise MergeMixError(
            f"{where}: architectures {b['architectures']}, the pool's base is {a['architectures']}"
        )
    # Only fields both define: transformers fills in every field of the model's config class,
    # so a field one side lacks is a leftover (e.g. 4.x-only keys written beside 5.x ones).
    for key in sorted((set(a) & set(b)) - HARMLESS_CONFIG):
        if a.get(key) != b.get(key):
            raise MergeMixError(
                f"{where}: {key} is {b.get(key)!r}, the pool's base has {a.get(key)!r};"
                " a component must share the base's architecture"
            )


def tensor_headers(model_dir: Path) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """Every tensor of the directory's safetensors files: name -> (shape, dtype, file), read
    from the headers only. Refuses a directory with pickled weights only."""
    from safetensors import SafetensorError, safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickled = sorted(
            p.name for pat in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in model_dir.glob(pat)
        )
        hint = (
            f" ({', '.join(pickled)} are pickles, which merge-mix never loads; save with"
            " save_pretrained(..., safe_serialization=True))"
            if pickled
            else ""
        )
        raise MergeMixError(f"{model_dir}: no .safetensors weights{hint}")
    out: dict[str, tuple[tuple[int, ...], str, str]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():
                    if name in out:
                        raise MergeMixError(f"{f}: tensor {name} is also in {out[name][2]}")
                    s = fh.get_slice(name)
                    out[name] = (tuple(s.get_shape()), s.get_dtype(), f.name)
        except SafetensorError as exc:
            raise MergeMixError(
                f"{f}: unreadable safetensors ({str(exc).splitlines()[0]})"
            ) from None
    return out


def tied_aliases(model_dir: Path) -> set[str]:
    """Parameter names a tied model reports twice (``lm_head.weight`` tied to the input
    embeddings): a trainer may save them or not. Built on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = _load_config(model_dir, "the pool's base")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return every - {n for n, _ in model.named_parameters()}


def check_tensors(base_dir: Path, model_dir: Path) -> int:
    """One-line error naming the first tensor whose name, shape or dtype differs from the
    base's; returns the number of tensors checked."""
    base = tensor_headers(base_dir)
    model = tensor_headers(model_dir)
    aliases = tied_aliases(base_dir)
    for name, (shape, dtype, _) in base.items():
        if name not in model:
            if name in aliases:
                continue
            raise MergeMixError(
                f"{model_dir}: tensor {name} is missing (the pool's base has it,"
                f" shape {list(shape)}, {dtype})"
            )
        mshape, mdtype, mfile = model[name]
        if mshape != shape:
            raise MergeMixError(
                f"{model_dir / mfile}: tensor {name} has shape {list(mshape)}, the pool's base"
                f" has {list(shape)}"
            )
        if mdtype != dtype:
            # A pool holds one dtype (training.storage_dtype); converting is the trainer's
            # choice to make, since bf16 -> fp32 is exact but fp32 -> bf16 rounds.
            cast = {"F32": "model.float()", "BF16": "model.to(torch.bfloat16)"}.get(
                dtype, f"model.to({dtype})"
            )
            raise MergeMixError(
                f"{model_dir / mfile}: tensor {name} is {mdtype}, the pool's base stores"
                f" {dtype}; save the weights in the base's dtype (e.g. {cast} before"
                " save_pretrained)"
            )
    for name, (_, _, mfile) in model.items():
        if name not in base and name not in aliases:
            raise MergeMixError(f"{model_dir / mfile}: tensor {name} is not in the pool's base")
    return len(model)


def _canonical_tokenizer_json(path: Path) -> dict[str, str]:
    """Per top-level key of a tokenizer.json, the sha256 of its canonical JSON."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MergeMixError(f"{path}: unreadable tokenizer file ({exc})") from None
    return {
        k: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()
        for k, v in data.items()
        if k not in _TOKENIZER_RUNTIME
    }


def tokenizer_sha256(tokenizer_dir: Path) -> str | None:
    """A hash of what a ``tokenizer.json`` encodes (its formatting and run-time settings
    aside), or None when there is none."""
    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        return None
    parts = _canonical_tokenizer_json(path)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def check_tokenizer(pool_tokenizer: Path, model_dir: Path) -> str:
    """One-line error when `model_dir` holds a tokenizer other than the pool's; returns
    what was checked (recorded in the provenance)."""
    from merge_mix.tokens import load_tokenizer

    present = [f for f in TOKENIZER_FILES if (model_dir / f).is_file()]
    if not present:
        return "no tokenizer files in the model directory: not checked (tensor shapes were)"
    fail = (
        f"{model_dir}: its tokenizer differs from the pool's ({{what}}); components must use"
        f" the pool's tokenizer, {pool_tokenizer}"
    )
    if (model_dir / "tokenizer.json").is_file() and (pool_tokenizer / "tokenizer.json").is_file():
        mine = _canonical_tokenizer_json(pool_tokenizer / "tokenizer.json")
        theirs = _canonical_tokenizer_json(model_dir / "tokenizer.json")
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key) != theirs.get(key):
                raise MergeMixError(fail.format(what=f"tokenizer.json: {key!r}"))
        return f"tokenizer.json equal to the pool's (sha256 {tokenizer_sha256(model_dir)})"
    ours, theirs_tok = load_tokenizer(pool_tokenizer), load_tokenizer(model_dir)
    if ours.get_vocab() != theirs_tok.get_vocab():
        raise MergeMixError(fail.format(what="vocabulary"))
    a = ours(_PROBE, add_special_tokens=False)["input_ids"]
    b = theirs_tok(_PROBE, add_special_tokens=False)["input_ids"]
    if a != b:
        raise MergeMixError(fail.format(what="encoding of a probe text"))
    return f"vocabulary and probe encoding equal to the pool's ({', '.join(present)})"


def parse_mixture(text: str | dict[str, float], domains: list[str]) -> dict[str, float]:
    """A declared training mixture (``code=0.5,c=0.25,prose=0.25`` or a dict): known
    domains, non-negative shares summing to 1 (within 1e-3)."""
    from merge_mix.merge import parse_assignment

    mix = parse_assignment(text, "--mixture") if isinstance(text, str) else dict(text)
    for d, p in mix.items():
        if d not in domains:
            raise MergeMixError(
                f"--mixture: {d!r} is not a domain of the pool (domains: {', '.join(domains)})"
            )
        if p < 0:
            raise MergeMixError(f"--mixture: {d}={p:g} is negative")
    total = sum(mix.values())
    if abs(total - 1.0) > 1e-3:
        raise MergeMixError(f"--mixture: shares sum to {total:.6g}, not 1")
    return {d: float(p) for d, p in mix.items() if p > 0}


def _check_recipe_mixture(declared: dict[str, float], recipe: dict[str, float], domain: str):
    for d in [*recipe, *(d for d in declared if d not in recipe)]:
        a, b = declared.get(d, 0.0), recipe.get(d, 0.0)
        if abs(a - b) > MIXTURE_TOLERANCE:
            raise MergeMixError(
                f"--mixture: {d}={a:g}, but the pool's {domain!r} component trains on"
                f" {d}={b:.6g} (its general_share of the general mix, the rest on {domain});"
                " merge weights stand for effective mixtures only when every component was"
                " trained on its recipe's mixture (`merge-mix plan` writes it)"
            )


# ---------------------------------------------------------------------------------------
# Staging and committing


def _stage(pool_dir: Path, model_dir: Path, out_dir: Path) -> Path:
    """``<out_dir>.tmp``: the source's safetensors files byte for byte (and their index),
    the base's config files and the pool tokenizer: a complete HF model directory."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in sorted(model_dir.glob("*.safetensors")):
        shutil.copyfile(f, tmp / f.name)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shutil.copyfile(index, tmp / index.name)
    base = pool_dir / "base"
    for name in ("config.json", "generation_config.json"):
        if (base / name).is_file():
            shutil.copyfile(base / name, tmp / name)
    for f in sorted((pool_dir / "tokenizer").iterdir()):
        if f.is_file() and f.name != "merge_mix_tokenizer.json":
            shutil.copyfile(f, tmp / f.name)
    shareable(tmp)
    return tmp


def _score(pool_dir: Path, model_dir: Path, spec, device) -> tuple[dict[str, float], int]:
    """Load the staged model through the pool's loader (the check that it loads) and score
    it on the search split, as `train-components` scores what it trains."""
    from merge_mix.evaluate import HeldoutSet, heldout_metrics
    from merge_mix.model import count_parameters, load_model

    model = load_model(model_dir, device)
    tok = read_json(pool_dir / "tokenizer" / "merge_mix_tokenizer.json")
    data = read_json(pool_dir / "data" / "data.json")
    heldout = HeldoutSet.from_pool_data(
        pool_dir / "data",
        list(data["domains"]),
        int(tok["bos_id"]),
        spec.model.seq_len,
        spec.training.eval_tokens,
        "search",
    )
    metrics = heldout_metrics(model, heldout, device, spec.training.precision)
    return metrics, count_parameters(model)


def _provenance(model_dir, declared, tokens, tokenizer_check, n_tensors, seed, wall_time_s):
    return {
        "source": str(model_dir.resolve()),
        "source_files": {f.name: f.stat().st_size for f in sorted(model_dir.glob("*.safetensors"))},
        "tensors": n_tensors,
        "declared_mixture": {d: round(p, 6) for d, p in declared.items()},
        "declared_tokens": int(tokens),
        "declared_seed": seed,
        "declared_wall_time_s": wall_time_s,
        "tokenizer_check": tokenizer_check,
        "imported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": library_versions(),
    }


def import_model(
    pool_dir: str | Path,
    model_dir: str | Path,
    mixture: str | dict[str, float],
    tokens: int,
    domain: str | None = None,
    role: str = "component",
    seed: int | None = None,
    replace: bool = False,
    device: str = "cpu",
    wall_time_s: float | None = None,
) -> ImportResult:
    """Check `model_dir` against the pool's base and copy it in as the component of
    `domain` (or, with ``role="reference"``, as the validation reference of `mixture` at
    `tokens` tokens and training seed `seed`, under the id `validate` looks it up by)."""
    from merge_mix.model import pick_device
    from merge_mix.pool import Pool, component_mixture, recorded_spec

    pool_dir, model_dir = Path(pool_dir), Path(model_dir)
    if role not in ROLES:
        raise MergeMixError(f"--as: {role!r} is not one of {', '.join(ROLES)}")
    pool = Pool.open(pool_dir, allow_empty=True, require_complete=role == "reference")
    if not model_dir.is_dir():
        raise MergeMixError(f"--model: {model_dir} not found")
    if (
        model_dir.resolve() == pool_dir.resolve()
        or pool_dir.resolve() in model_dir.resolve().parents
    ):
        raise MergeMixError(
            f"--model: {model_dir} is inside the pool; import from a directory outside it"
        )
    if isinstance(tokens, bool) or int(tokens) <= 0:
        raise MergeMixError(f"--tokens: must be > 0, got {tokens}")
    tokens = int(tokens)
    if wall_time_s is not None and not (math.isfinite(wall_time_s) and wall_time_s >= 0):
        raise MergeMixError(f"--wall-time-s: must be >= 0, got {wall_time_s}")
    spec = recorded_spec(pool_dir)
    data_domains = list(pool.manifest["data"])
    warnings: list[str] = []
    if role == "component":
        if domain is None:
            raise MergeMixError("--domain: required to import a component")
        if domain not in spec.domain_names:
            raise MergeMixError(
                f"--domain: {domain!r} is not a domain of pool {pool_dir}"
                f" (domains: {', '.join(spec.domain_names)})"
            )
        declared = parse_mixture(mixture, data_domains)
        general = pool.manifest["general_mixture"]
        recipe = component_mixture(domain, general, spec.general_share)
        _check_recipe_mixture(declared, recipe, domain)
        t = spec.training
        per_step = t.batch_size * t.grad_accum * spec.model.seq_len
        planned = max(1, math.ceil(t.component_tokens / per_step)) * per_step
        if tokens not in (t.component_tokens, planned):
            warnings.append(
                f"warning: --tokens {tokens:,} differs from the pool's budget"
                f" (training.component_tokens {t.component_tokens:,}, {planned:,} in whole"
                " steps): the component is merged all the same, but its budget differs from"
                " its peers'"
            )
    else:
        if domain is not None:
            raise MergeMixError("--domain: a reference has no domain (drop --domain)")
        declared = parse_mixture(mixture, pool.domains)

    # The checks, cheapest first; nothing is written before they all pass.
    check_config(pool.base_dir, model_dir)
    n_tensors = check_tensors(pool.base_dir, model_dir)
    tokenizer_check = check_tokenizer(pool.tokenizer_dir, model_dir)
    provenance = _provenance(
        model_dir, declared, tokens, tokenizer_check, n_tensors, seed, wall_time_s
    )
    dev = pick_device(device)
    available = {d: float(pool.manifest["data"][d]["train"]["tokens"]) for d in data_domains}
    if role == "component":
        return _import_component(
            pool_dir, model_dir, spec, domain, recipe, tokens, seed, wall_time_s, replace,
            dev, available, provenance, warnings,
        )  # fmt: skip
    return _import_reference(
        pool, model_dir, spec, declared, tokens, seed, wall_time_s, replace, dev, available,
        provenance, warnings,
    )  # fmt: skip


def _import_component(
    pool_dir, model_dir, spec, domain, recipe, tokens, seed, wall_time_s, replace, device,
    available, provenance, warnings,
) -> ImportResult:  # fmt: skip
    from merge_mix.pool import write_manifest
    from merge_mix.train import commit_model

    out_dir = pool_dir / "components" / domain
    record_path = out_dir / "component.json"
    # The lock `train-components` takes per component: never import over a running training.
    with file_lock(pool_dir / "work" / f"{domain}.lock", False) as mine:
        if not mine:
            raise MergeMixError(
                f"--domain: component {domain!r} of {pool_dir} is being trained by another"
                " process; wait for it, then import with --replace"
            )
        if record_path.is_file() and not replace:
            old = read_json(record_path)
            how = (
                f"imported from {old.get('provenance', {}).get('source', '?')}"
                if old.get("imported")
                else "trained by train-components"
            )
            raise MergeMixError(
                f"--domain: {out_dir} already holds a finished component ({how});"
                " pass --replace to replace it"
            )
        tmp = _stage(pool_dir, model_dir, out_dir)
        try:
            metrics, parameters = _score(pool_dir, tmp, spec, device)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        record = {
            "path": str(out_dir.relative_to(pool_dir)),
            "domain": domain,
            "imported": True,
            "training_mixture": {d: round(p, 6) for d, p in recipe.items()},
            "tokens_seen": tokens,
            "domain_tokens": {d: round(tokens * p) for d, p in recipe.items()},
            "epochs": {d: round(tokens * p / max(available[d], 1.0), 4) for d, p in recipe.items()},
            "steps": None,
            "world_size": None,
            "heldout": _nested(metrics),
            "heldout_split": "search",
            "heldout_tokens": spec.training.eval_tokens,
            "final_train_loss": None,
            "parameters": parameters,
            "seed": seed,
            "wall_time_s": wall_time_s,
            "initialised_from": None,
            "provenance": provenance,
            "versions": library_versions(),
        }
        record["sha256"] = commit_model(tmp, out_dir)
        write_json_atomic(record_path, record)
        # A checkpoint left by an interrupted training of this domain is not this component's.
        shutil.rmtree(pool_dir / "work" / domain, ignore_errors=True)
    write_manifest(spec, pool_dir)
    return ImportResult("component", domain, out_dir, record["sha256"], record, warnings)


def _import_reference(
    pool, model_dir, spec, declared, tokens, seed, wall_time_s, replace, device, available,
    provenance, warnings,
) -> ImportResult:  # fmt: skip
    import numpy as np

    from merge_mix.merge import mixture_to_weights
    from merge_mix.train import commit_model
    from merge_mix.validate.references import (
        FORMAT,
        FORMAT_VERSION,
        RECORD,
        data_seed,
        reference_dir,
        reference_id,
    )

    training_seed = 0 if seed is None else int(seed)
    # As declared, not renormalised: the id rounds shares to 6 decimals, so a mixture typed
    # with 6 decimals finds the reference validate asks for.
    vec = np.array([declared.get(d, 0.0) for d in pool.domains], dtype=np.float64)
    ref_id = reference_id(pool, vec, tokens, training_seed)
    out_dir = reference_dir(pool, ref_id)
    weights = mixture_to_weights(
        vec, pool.general_share, pool.general_mixture(), pool.domains, extrapolate=True
    )
    with file_lock(pool.path / "work" / f"ref-{ref_id}.lock", False) as mine:
        if not mine:
            raise MergeMixError(
                f"reference {ref_id} of {pool.path} is being trained by another process"
            )
        if (out_dir / RECORD).is_file() and not replace:
            raise MergeMixError(
                f"{out_dir} already holds the reference of this mixture, budget and seed;"
                " pass --replace to replace it"
            )
        tmp = _stage(pool.path, model_dir, out_dir)
        try:
            metrics, parameters = _score(pool.path, tmp, spec, device)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        record = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "id": ref_id,
            "path": str(out_dir.relative_to(pool.path)),
            "imported": True,
            "effective_mixture": {
                d: round(float(p), 6) for d, p in zip(pool.domains, vec, strict=True)
            },
            "merge_weights": {
                d: round(float(w), 6) for d, w in zip(pool.domains, weights, strict=True)
            },
            "tokens": tokens,
            "component_tokens": spec.training.component_tokens,
            "tokens_seen": tokens,
            "domain_tokens": {d: round(tokens * p) for d, p in declared.items()},
            "epochs": {
                d: round(tokens * p / max(available[d], 1.0), 4) for d, p in declared.items()
            },
            "steps": None,
            "resumed_from_step": 0,
            "heldout": {k: round(v, 6) for k, v in metrics.items()},
            "heldout_tokens": spec.training.eval_tokens,
            "final_train_loss": None,
            "parameters": parameters,
            "initialised_from": None,
            "base_sha256": pool.manifest["base"].get("sha256"),
            "seed": data_seed(pool, training_seed),
            "training_seed": training_seed,
            # validate averages training costs over references: an undeclared cost counts 0 s.
            "wall_time_s": 0.0 if wall_time_s is None else float(wall_time_s),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "provenance": provenance,
            "versions": library_versions(),
        }
        record["sha256"] = commit_model(tmp, out_dir)
        write_json_atomic(out_dir / RECORD, record)
    return ImportResult("reference", ref_id, out_dir, record["sha256"], record, warnings)


def _nested(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """``heldout/<d>/<m>`` -> ``{d: {m: value}}``, as component records hold them."""
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        _, d, m = key.split("/")
        if m in ("loss", "ppl", "bpb"):
            out.setdefault(d, {})[m] = round(value, 6)
    return out
