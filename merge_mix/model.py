"""Models: build the pool's Llama architecture, load and save through safetensors only,
pick the device and the autocast precision."""

from __future__ import annotations

import contextlib
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
    return model.to(device).eval()


def save_model(model, path: Path) -> None:
    """`save_pretrained` as safetensors (one file up to 10 GB, shards beyond)."""
    from merge_mix.artifacts import shareable

    quiet_transformers()
    model.save_pretrained(str(path), safe_serialization=True, max_shard_size="10GB")
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
