"""Models: build the pool's Llama architecture, load and save through safetensors only,
pick the device and the autocast precision.

Saved models carry a ``config.json`` that transformers 4.x and 5.x both read: 5.x writes
rope settings only as ``rope_parameters`` and the dtype only as ``dtype``, which 4.x
ignores (a ``rope_theta`` of 500000 would load there as 10000), so `save_model` also
writes the 4.x keys with the same values (`add_legacy_config_keys`)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
from pathlib import Path

import torch

from merge_mix.config import ModelSpec
from merge_mix.errors import MergeMixError


def quiet_transformers() -> None:
    """Silence transformers' own progress bars and advisory warnings; ours say enough."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def pick_device(requested: str = "auto") -> torch.device:
    """`auto`: the first CUDA device (or this process's LOCAL_RANK one), then MPS, then CPU."""
    import os

    if requested != "auto":
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise MergeMixError(f"device: {requested!r} is not a torch device") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise MergeMixError(f"device: {requested!r} requested but CUDA is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast on CUDA (or when asked); plain fp32 otherwise. Weights stay fp32."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_model(spec: ModelSpec, vocab_size: int, bos_id: int, eos_id: int, seed: int):
    """A freshly initialised Llama causal LM from the spec (deterministic given `seed`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.seq_len,
        rope_theta=spec.rope_theta,
        tie_word_embeddings=spec.tie_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def load_model(path: str | Path, device: torch.device | str = "cpu"):
    """Load a local HF causal-LM directory, safetensors only, no remote code, in fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise MergeMixError(f"{path}: not a model directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise MergeMixError(f"{path}: no .safetensors weights (merge-mix loads safetensors only)")
    try:
        config = AutoConfig.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False
        )
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            config=config,
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=True,
            torch_dtype=torch.float32,
        )
    except (OSError, ValueError, KeyError) as exc:
        raise MergeMixError(f"{path}: cannot load model ({str(exc).splitlines()[0]})") from None
    except Exception as exc:
        from safetensors import SafetensorError

        if not isinstance(exc, SafetensorError):
            raise
        names = ", ".join(f.name for f in sorted(path.glob("*.safetensors")))
        raise MergeMixError(
            f"{path}/{names}: unreadable safetensors ({str(exc).splitlines()[0]};"
            " truncated or damaged?)"
        ) from None
    return model.to(device).eval()


def check_pretrained(path: str | Path, where: str = "model.pretrained"):
    """The config of a pretrained base, or a one-line error naming `where` unless it is a
    local directory `AutoModelForCausalLM` loads (no remote code) as a causal LM: not an
    encoder-decoder, and not an encoder (BERT, RoBERTa, ...) without ``is_decoder: true``,
    whose predictions would see the tokens they predict."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    quiet_transformers()
    path = Path(path)
    if not path.is_dir():
        raise MergeMixError(f"{where}: {path} not found")
    if not (path / "config.json").is_file():
        raise MergeMixError(f"{where}: {path} is not a model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError) as exc:
        raise MergeMixError(f"{where}: {path}: {str(exc).splitlines()[0]}") from None
    kind = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        raise MergeMixError(
            f"{where}: {path} is an encoder-decoder model ({kind}); the base must be a"
            " decoder-only causal LM"
        )
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise MergeMixError(
            f"{where}: {path}: AutoModelForCausalLM cannot load a {kind!r} model (without"
            " remote code); the base must be a causal LM"
        )
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise MergeMixError(
            f"{where}: {path} is an encoder ({kind}, is_decoder: false): each prediction would"
            " see the tokens it predicts; the base must be a causal LM"
        )
    return config


@torch.no_grad()
def check_causal(model, where: str = "model.pretrained") -> None:
    """Refuse a model whose predictions at a position change with later tokens."""
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, 8), generator=generator)
    device = next(model.parameters()).device
    before = model(input_ids=ids.to(device)).logits[0, :-1]
    ids[0, -1] = (ids[0, -1] + 1) % vocab
    after = model(input_ids=ids.to(device)).logits[0, :-1]
    # A causal model computes earlier positions identically (same shapes, same kernels);
    # a tiny random encoder's leak can be as small as 4e-5, so the bound is float noise.
    scale = max(1.0, float(before.abs().max()))
    if not torch.allclose(before, after, atol=1e-6 * scale, rtol=0.0):
        raise MergeMixError(
            f"{where}: predictions depend on later tokens (attention is not causal); the"
            " base must be a causal LM"
        )


def add_legacy_config_keys(config: dict) -> dict:
    """`config` (a ``config.json`` dict) with the keys transformers 4.x reads added beside
    the 5.x ones, same values; keys already present are kept.

    - ``rope_parameters`` (one set for every layer) -> ``rope_theta``, ``rope_scaling``
      (non-default rope types), ``partial_rotary_factor``; GPT-NeoX's ``rotary_emb_base``
      and ``rotary_pct``;
    - ``rope_parameters`` per layer type (Gemma 3 style) -> ``rope_theta`` and
      ``rope_scaling`` of full attention, ``rope_local_base_freq`` of sliding attention;
    - ``dtype`` -> ``torch_dtype``."""
    out = dict(config)
    rope = out.get("rope_parameters")
    if isinstance(rope, dict) and rope and all(isinstance(v, dict) for v in rope.values()):
        full, sliding = rope.get("full_attention"), rope.get("sliding_attention")
        if sliding and "rope_theta" in sliding:
            out.setdefault("rope_local_base_freq", sliding["rope_theta"])
        rope = full
    if isinstance(rope, dict) and "rope_theta" in rope:
        out.setdefault("rope_theta", rope["rope_theta"])
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default" and out.get("rope_scaling") is None:
            scaling = {
                k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")
            }
            out["rope_scaling"] = {**scaling, "rope_type": kind, "type": kind}
        if "partial_rotary_factor" in rope:
            out.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
        if out.get("model_type") == "gpt_neox":
            out.setdefault("rotary_emb_base", rope["rope_theta"])
            out.setdefault("rotary_pct", rope.get("partial_rotary_factor", 1.0))
    if "dtype" in out:
        out.setdefault("torch_dtype", out["dtype"])
    return out


def disk_full_error(exc: Exception, path: Path | str) -> OSError | None:
    """``OSError(ENOSPC)`` naming `path` if `exc` is safetensors' report of a full disk or
    quota, else None. safetensors raises its own error type with no errno for these; the
    CLI says OSErrors with an errno in one line."""
    text = str(exc)
    if "StorageFull" in text or "QuotaExceeded" in text or "No space left" in text:
        return OSError(errno.ENOSPC, "No space left on device", str(path))
    return None


def save_model(model, path: Path) -> None:
    """`save_pretrained` as safetensors (one file up to 10 GB, shards beyond), with a
    ``config.json`` that transformers 4.x reads too (`add_legacy_config_keys`)."""
    import json

    from safetensors import SafetensorError

    from merge_mix.artifacts import shareable

    quiet_transformers()
    try:
        model.save_pretrained(str(path), safe_serialization=True, max_shard_size="10GB")
    except SafetensorError as exc:
        full = disk_full_error(exc, path)
        if full is not None:
            raise full from exc
        raise
    config_path = Path(path) / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(
        json.dumps(add_legacy_config_keys(config), indent=2, sort_keys=True) + "\n"
    )
    shareable(Path(path))


def weights_sha256(path: Path) -> str:
    """SHA-256 over the directory's safetensors files, in name order."""
    h = hashlib.sha256()
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise MergeMixError(f"{path}: no .safetensors weights")
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
