"""Export a mixture proxy as an ordinary Hugging Face model directory.

The directory holds ``config.json``, safetensors weights and the pool tokenizer, so
``AutoModelForCausalLM.from_pretrained(OUT)`` loads it, with transformers 4.x (from 4.46)
as with 5.x (`merge_mix.model.save_model`, `merge_mix.tokens.save_tokenizer`), plus ``merge_mix_export.json``
(pool, merge weights, effective mixture, sha256) and ``mergekit.yaml``, a mergekit
config that reproduces the same merge with mergekit's ``linear`` method. It is
written to a temporary sibling directory and renamed into place when complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from merge_mix.artifacts import library_versions, write_json_atomic
from merge_mix.errors import MergeMixError


def _filter_substring(pattern: str) -> str | None:
    """mergekit filters match substrings; of our globs only ``*x*`` means the same."""
    core = pattern[1:-1]
    if len(pattern) < 3 or pattern[0] != "*" or pattern[-1] != "*":
        return None
    if any(c in core for c in "*?[]"):
        return None
    return core


def mergekit_config(
    base_dir: Path, component_dirs: dict[str, Path], weights: np.ndarray, keep_base: tuple[str, ...]
) -> str:
    """A mergekit YAML for ``theta_base + sum_i w_i (theta_i - theta_base)``.

    With ``normalize: false``, mergekit's ``linear`` computes ``sum_m c_m theta_m``; giving
    the base the coefficient ``1 - sum(w)`` makes that our rule exactly, for any weights.
    Parameters kept at the base get coefficient 1 on the base and 0 on components."""
    import yaml

    filters = []
    for pat in keep_base:
        sub = _filter_substring(pat)
        if sub is None:
            raise MergeMixError(
                f"--keep-base {pat!r}: mergekit filters match substrings only; use a pattern"
                " like '*embed_tokens*' to export a mergekit config"
            )
        filters.append(sub)

    def weight(value: float, kept: float) -> float | list:
        if not filters:
            return round(float(value), 10)
        return [{"filter": f, "value": kept} for f in filters] + [
            {"value": round(float(value), 10)}
        ]

    models = []
    base_coef = 1.0 - float(np.sum(weights))
    if filters or abs(base_coef) > 1e-12:
        models.append({"model": str(base_dir), "parameters": {"weight": weight(base_coef, 1.0)}})
    for (_, path), w in zip(component_dirs.items(), weights, strict=True):
        models.append({"model": str(path), "parameters": {"weight": weight(w, 0.0)}})
    config = {
        "merge_method": "linear",
        "parameters": {"normalize": False},
        "dtype": "float32",
        "models": models,
    }
    if (base_dir / "tokenizer_config.json").is_file():
        config["tokenizer_source"] = str(base_dir)
    header = "# Reproduces a merge-mix merge with mergekit: mergekit-yaml mergekit.yaml OUT\n"
    return header + yaml.safe_dump(config, sort_keys=False)


def export_proxy(pool, merger, weights: np.ndarray, out: Path, force: bool = False) -> Path:
    """Merge `weights` with `merger` (over `pool`'s components) and write `out`: all of it
    or, on any failure, nothing."""
    out = Path(out)
    if out.exists() and not force:
        raise MergeMixError(f"{out}: already exists (use --force to replace it)")
    model = merger.merge(weights)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(pool, merger, weights, model, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _write(pool, merger, weights: np.ndarray, model, tmp: Path) -> None:
    from merge_mix.merge import effective_mixture
    from merge_mix.model import save_model, weights_sha256
    from merge_mix.tokens import load_tokenizer, save_tokenizer

    comps = {d: pool.component_dir(d).resolve() for d in pool.domains}
    merged = merger.sha256 or {
        who: weights_sha256(path) for who, (path, _) in pool.members().items()
    }
    # Built first: a keep-base pattern mergekit cannot express fails before any big write.
    kit = mergekit_config(pool.base_dir.resolve(), comps, weights, merger.keep_base)
    save_model(model, tmp)
    save_tokenizer(load_tokenizer(pool.tokenizer_dir), tmp)
    (tmp / "mergekit.yaml").write_text(kit)
    record = {
        "pool": str(pool.path.resolve()),
        "pool_name": pool.name,
        "merge_weights": dict(zip(pool.domains, map(float, weights), strict=True)),
        "effective_mixture": dict(
            zip(
                pool.domains,
                map(float, effective_mixture(weights, pool.general_share, pool.general_mixture())),
                strict=True,
            )
        ),
        "keep_base": list(merger.keep_base),
        # The hashes of the files merged (verified by `merger_for_pool`), not the manifest's.
        "base_sha256": merged["base"],
        "components_sha256": {d: merged[d] for d in pool.domains},
        "sha256": weights_sha256(tmp),
        # What a stock `lm_eval --model hf` run needs to score like merge-mix (one BOS).
        "lm_eval_model_args": f"add_bos_token=False,prefix_token_id={pool.bos_id}",
        "versions": library_versions(),
    }
    write_json_atomic(tmp / "merge_mix_export.json", record)
