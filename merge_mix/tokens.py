"""Tokenizer and token shards: text pieces -> flat memory-mapped token arrays.

Each domain and split (``train``, ``search``, ``test``) is tokenized once into
``data/<domain>/<split>.tokens``, a flat little-endian array (uint16 when the vocabulary
fits, else uint32) holding every piece as ``BOS tokens... EOS``, and
``<split>.index.npy``, an int64 array with one row per piece:
``(start, n_tokens, n_bytes, document)``, where ``start`` is the offset of the piece's
first text token (after its BOS), ``n_tokens`` excludes BOS and EOS, and ``document``
numbers the source document the piece was cut from (pieces of one document are
contiguous; bootstrap intervals resample whole documents). The held-out splits also keep
their text, ``<split>.jsonl``. Training samples windows from the flat stream; held-out
scoring reads pieces through the index.

BOS, for every kind of tokenizer: pieces are encoded with ``add_special_tokens=False``,
so a tokenizer whose post-processor adds BOS (Llama 3, Mistral, Gemma) adds nothing, and
the pool's BOS is prepended explicitly: the tokenizer's BOS token, or its EOS for one
without BOS (GPT-2, GPT-NeoX, Qwen2), as `special_ids` says. The evaluator and lm-eval
(`merge_mix.lmeval`) put exactly that one token before every scored text.

Pool tokenizers are saved by `save_tokenizer` as ``tokenizer.json`` with
``tokenizer_class: PreTrainedTokenizerFast``, a class transformers 4.x and 5.x both
have: the family's own class (5.x's ``TokenizersBackend``, or ``LlamaTokenizer``, which
5.x rebuilds from the vocabulary) would not load in 4.x or would not encode the same.

`MixtureSampler` draws training sequences from several domains in given proportions.
A batch is a pure function of (seed, step, micro-step), so a resumed run needs no
sampler state beyond the step counter, and every process of a torchrun job can draw the
same global batch and keep its own slice.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
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


def write_shard(
    tokenizer,
    documents: Sequence[Sequence[str]],
    out_dir: Path,
    split: str,
    batch: int = 512,
    keep_text: bool = False,
) -> dict[str, int]:
    """Tokenize `documents` (each a list of pieces) into `<split>.tokens` +
    `<split>.index.npy`; with `keep_text`, also `<split>.jsonl` (one piece a line, with its
    document number). Returns counts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    bos, eos = special_ids(tokenizer)
    dtype = token_dtype(len(tokenizer))
    pieces = [(i, p) for i, doc in enumerate(documents) for p in doc]
    index = np.zeros((len(pieces), 4), dtype=np.int64)
    tmp = out_dir / f"{split}.tokens.tmp"
    text_tmp = out_dir / f"{split}.jsonl.tmp"
    pos = 0
    text_out = text_tmp.open("w", encoding="utf-8") if keep_text else contextlib.nullcontext()
    with tmp.open("wb") as fh, text_out as th:
        for lo in range(0, len(pieces), batch):
            chunk = pieces[lo : lo + batch]
            ids = tokenizer([p for _, p in chunk], add_special_tokens=False)["input_ids"]
            for j, ((doc, text), toks) in enumerate(zip(chunk, ids, strict=True)):
                arr = np.asarray([bos, *toks, eos], dtype=dtype)
                fh.write(arr.tobytes())
                index[lo + j] = (pos + 1, len(toks), len(text.encode("utf-8")), doc)
                pos += len(arr)
                if th is not None:
                    th.write(json.dumps({"document": doc, "text": text}) + "\n")
    np.save(out_dir / f"{split}.index.npy", index)
    if keep_text:
        text_tmp.replace(out_dir / f"{split}.jsonl")
    tmp.replace(out_dir / f"{split}.tokens")
    return {
        "documents": len(documents),
        "pieces": len(pieces),
        "tokens": int(index[:, 1].sum()),
        "stream_tokens": pos,
        "bytes": int(index[:, 2].sum()),
    }


@dataclass
class Shard:
    """One domain/split on disk: the memory-mapped stream and its piece index."""

    tokens: np.ndarray
    index: np.ndarray

    @classmethod
    def open(cls, data_dir: Path, split: str) -> Shard:
        meta_path = data_dir.parent / "data.json"
        if not meta_path.is_file() and data_dir.parent.name == "targets":
            meta_path = data_dir.parent.parent / "data.json"  # a target set's shard
        dtype = np.dtype("<u2")
        if meta_path.is_file():
            dtype = np.dtype(json.loads(meta_path.read_text())["token_dtype"])
        path = data_dir / f"{split}.tokens"
        if not path.is_file():
            raise MergeMixError(f"{path}: token shard missing (pool incomplete?)")
        tokens = np.memmap(path, dtype=dtype, mode="r")
        index = np.load(data_dir / f"{split}.index.npy", allow_pickle=False)
        return cls(tokens=tokens, index=index)

    def piece(self, i: int) -> np.ndarray:
        start, n = self.index[i, 0], self.index[i, 1]
        return np.asarray(self.tokens[start : start + n], dtype=np.int64)


class MixtureSampler:
    """Draws (batch, seq_len + 1) token windows from domains in fixed proportions.

    The domain of each sequence is drawn independently with probability `weights[d]`
    and the window start uniformly over the domain's training stream, from a generator
    seeded by (seed, step, micro_step): deterministic, resumable and rank-independent.
    """

    def __init__(
        self, streams: dict[str, np.ndarray], weights: dict[str, float], seq_len: int, seed: int
    ):
        self.domains = [d for d in streams if weights.get(d, 0.0) > 0]
        if not self.domains:
            raise MergeMixError("sampler: the training mixture gives no domain a positive weight")
        w = np.array([weights[d] for d in self.domains], dtype=np.float64)
        self.probs = w / w.sum()
        self.streams = [streams[d] for d in self.domains]
        self.seq_len = seq_len
        self.seed = seed
        for d, s in zip(self.domains, self.streams, strict=True):
            if len(s) < seq_len + 1:
                raise MergeMixError(
                    f"domain {d!r}: only {len(s)} training tokens, fewer than seq_len + 1"
                    f" ({seq_len + 1})"
                )

    def batch(self, step: int, micro_step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Return the token windows and how many sequences came from each domain."""
        rng = np.random.default_rng([self.seed, step, micro_step])
        which = rng.choice(len(self.domains), size=batch_size, p=self.probs)
        out = np.empty((batch_size, self.seq_len + 1), dtype=np.int64)
        for row, k in enumerate(which):
            stream = self.streams[k]
            start = int(rng.integers(0, len(stream) - self.seq_len))
            out[row] = stream[start : start + self.seq_len + 1]
        counts = np.bincount(which, minlength=len(self.domains))
        return out, counts
