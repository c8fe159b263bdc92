"""The pool's tokenizer: training a byte-level BPE, loading and saving, BOS and EOS.

BOS, for every kind of tokenizer: pieces are encoded with ``add_special_tokens=False``,
so a tokenizer whose post-processor adds BOS (Llama 3, Mistral, Gemma) adds nothing, and
the pool's BOS is prepended explicitly: the tokenizer's BOS token, or its EOS for one
without BOS (GPT-2, GPT-NeoX, Qwen2), as `special_ids` says. The evaluator and lm-eval
(`merge_mix.lmeval`) put exactly that one token before every scored text.

Pool tokenizers are saved by `save_tokenizer` as ``tokenizer.json`` with
``tokenizer_class: PreTrainedTokenizerFast``, a class transformers 4.x and 5.x both
have: the family's own class (5.x's ``TokenizersBackend``, or ``LlamaTokenizer``, which
5.x rebuilds from the vocabulary) would not load in 4.x or would not encode the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from merge_mix.errors import MergeMixError

BOS = "<|bos|>"
EOS = "<|eos|>"


def train_tokenizer(texts_by_domain: dict[str, list[str]], vocab_size: int, sample_bytes: int):
    """Train a byte-level BPE on an even sample of every domain; return a
    `PreTrainedTokenizerFast` with BOS/EOS (EOS doubles as padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    per_domain = max(1, sample_bytes // max(1, len(texts_by_domain)))
    sample: list[str] = []
    for texts in texts_by_domain.values():
        taken = 0
        for t in texts:
            if taken >= per_domain:
                break
            sample.append(t)
            taken += len(t.encode("utf-8"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sample, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000_000,
    )


def load_tokenizer(path: str | Path):
    """Load a local tokenizer directory (never remote code, never the hub)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise MergeMixError(f"{path}: tokenizer directory not found")
    try:
        tok = AutoTokenizer.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError) as exc:
        raise MergeMixError(f"{path}: cannot load tokenizer ({str(exc).splitlines()[0]})") from None
    if tok.eos_token_id is None:
        raise MergeMixError(f"{path}: tokenizer has no EOS token")
    return tok


def save_tokenizer(tokenizer, path: str | Path) -> None:
    """`save_pretrained` into `path`, loadable alike by transformers 4.x and 5.x: the
    whole tokenizer in ``tokenizer.json`` and ``tokenizer_class: PreTrainedTokenizerFast``."""
    path = Path(path)
    tokenizer.save_pretrained(str(path))
    if not (path / "tokenizer.json").is_file():
        raise MergeMixError(
            f"{path}: the tokenizer ({type(tokenizer).__name__}) saved no tokenizer.json;"
            " merge-mix needs a fast (tokenizers) tokenizer"
        )
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    # 5.x's name for its tokenizers backend; 4.x would pass it on as an unknown argument.
    config.pop("backend", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def special_ids(tokenizer) -> tuple[int, int]:
    """(bos, eos) ids; a tokenizer without BOS uses EOS to open documents, as GPT-2 does."""
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    return int(bos), int(eos)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def encode_pieces(tokenizer, pieces: list[str]) -> list[list[int]]:
    """Token ids of each piece, without special tokens: what ``tokenizer(pieces,
    add_special_tokens=False)`` returns, straight from the fast backend (no padding or
    truncation is configured on pool tokenizers, so the two agree)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return tokenizer(pieces, add_special_tokens=False)["input_ids"]
    return [e.ids for e in backend.encode_batch(pieces, add_special_tokens=False)]
