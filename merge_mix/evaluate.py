"""Held-out perplexity: our fast evaluator over the pool's pre-tokenized held-out shards.

What is averaged, exactly
-------------------------
For each domain we take held-out pieces in index order (a fixed pseudo-random order)
until their text tokens reach the domain's token budget; whole pieces only, at least one.
Each piece with text tokens ``t_0 .. t_{n-1}`` is scored the way lm-evaluation-harness
scores a ``loglikelihood_rolling`` document: the model sees ``BOS t_0 ... t_{n-2}`` and
every ``t_i`` is predicted exactly once, in windows of the model's context length
``L``; window ``k`` predicts ``t[kL : kL+L]`` from the ``L`` preceding inputs (the last
window is right-aligned, so it keeps up to ``L`` tokens of context). EOS is not scored.
Then, per domain, over all scored tokens of all its pieces:

- ``loss`` = total negative log-likelihood (nats) / number of scored tokens,
- ``ppl``  = ``exp(loss)``,
- ``bpb``  = total negative log-likelihood / (UTF-8 bytes of the pieces * ln 2),

i.e. token-weighted means, not means of per-piece means; ``bpb`` is lm-eval's
``bits_per_byte`` for the same documents, and does not depend on the tokenizer.

Metric names are ``heldout/<domain>/loss``, ``heldout/<domain>/ppl``, ``heldout/<domain>/bpb``.
A pool's target sets (evaluation-only data, `merge_mix.targets`) are scored the same way,
on the same split, under the key ``target/<name>`` and the metric names
``target/<name>/{loss,ppl,bpb}``.

Which pieces
------------
A pool's held-out documents are split into ``search`` (what searches select on) and
``test`` (what final verdicts and `validate` judge on); a `HeldoutSet` reads one of them.
Every metric is computed from per-document sums (`DocumentScores`: negative
log-likelihood, scored tokens and bytes of each held-out document), so a comparison of two
models can resample documents (a paired bootstrap, `merge_mix.compare`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from merge_mix.model import autocast
from merge_mix.tokens import Shard

TARGET_PREFIX = "target/"
"""Scores of a target set are keyed ``target/<name>`` (domains by their bare name)."""
TARGETS_DIR = "targets"
"""Target sets' shards live in ``data/targets/<name>/{search,test}.*``."""


def metric_prefix(key: str) -> str:
    """The metric-name prefix of a scored set: ``heldout/<domain>`` or ``target/<name>``."""
    return key if key.startswith(TARGET_PREFIX) else f"heldout/{key}"


@dataclass
class DomainWindows:
    """One domain's scoring windows, padded to a common length, in piece order."""

    input_ids: torch.Tensor  # (n_windows, L) int64, right-padded
    labels: torch.Tensor  # (n_windows, L) int64, -100 where not scored
    piece_end: np.ndarray  # window count after each piece (for token-budget prefixes)
    piece_tokens: np.ndarray  # cumulative scored tokens after each piece
    piece_bytes: np.ndarray  # cumulative bytes after each piece
    piece_document: np.ndarray  # the document each piece was cut from (0, 1, ... in order)

    def prefix(self, max_tokens: int | None) -> tuple[int, int, int]:
        """(windows, tokens, bytes) of the shortest piece prefix reaching `max_tokens`."""
        if max_tokens is None:
            i = len(self.piece_end) - 1
        else:
            i = int(np.searchsorted(self.piece_tokens, max_tokens, side="left"))
            i = min(i, len(self.piece_end) - 1)
        return int(self.piece_end[i]), int(self.piece_tokens[i]), int(self.piece_bytes[i])


def rolling_windows(
    tokens: np.ndarray, bos: int, seq_len: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """lm-eval's disjoint rolling windows for one piece, as (input ids, labels) pairs.

    With ``x = [BOS] + t[:-1]``, input position ``j`` predicts ``t[j]``. Window ``k``
    predicts ``t[a:b]`` (``a = kL``) from inputs ``x[s:b]``, ``s = max(0, b - L)``; labels
    before ``a`` are context only and set to -100."""
    n = len(tokens)
    x = np.concatenate([[bos], tokens[:-1]]).astype(np.int64)
    out = []
    for a in range(0, n, seq_len):
        b = min(a + seq_len, n)
        s = max(0, b - seq_len)
        labels = np.asarray(tokens[s:b], dtype=np.int64).copy()
        labels[: a - s] = -100
        out.append((x[s:b], labels))
    return out


def build_windows(
    shard: Shard, bos: int, seq_len: int, max_tokens: int | None, first_piece: int = 0
) -> DomainWindows:
    """Scoring windows for the held-out pieces of one domain from `first_piece` on, up to
    `max_tokens`."""
    inputs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    piece_end, piece_tokens, piece_bytes, piece_document = [], [], [], []
    tokens_total = bytes_total = 0
    documents: dict[int, int] = {}
    for i in range(first_piece, len(shard.index)):
        toks = shard.piece(i)
        if len(toks) == 0:
            continue
        for inp, lab in rolling_windows(toks, bos, seq_len):
            pad = seq_len - len(inp)
            # Right padding is safe: a causal model's earlier positions never see it.
            inputs.append(np.pad(inp, (0, pad), constant_values=bos))
            labels.append(np.pad(lab, (0, pad), constant_values=-100))
        tokens_total += len(toks)
        bytes_total += int(shard.index[i, 2])
        piece_end.append(len(inputs))
        piece_tokens.append(tokens_total)
        piece_bytes.append(bytes_total)
        doc = int(shard.index[i, 3]) if shard.index.shape[1] > 3 else i
        piece_document.append(documents.setdefault(doc, len(documents)))
        if max_tokens is not None and tokens_total >= max_tokens:
            break
    return DomainWindows(
        input_ids=torch.from_numpy(np.stack(inputs)),
        labels=torch.from_numpy(np.stack(labels)),
        piece_end=np.asarray(piece_end),
        piece_tokens=np.asarray(piece_tokens),
        piece_bytes=np.asarray(piece_bytes),
        piece_document=np.asarray(piece_document),
    )


class HeldoutSet:
    """Every domain's held-out scoring windows of one split, built once and kept resident."""

    def __init__(
        self, windows: dict[str, DomainWindows], max_tokens: int | None, split: str = "search"
    ):
        self.windows = windows
        self.max_tokens = max_tokens
        self.split = split

    def documents(self, max_tokens: int | None = None) -> dict[str, int]:
        """Documents scored per domain within a token budget."""
        out = {}
        for d, w in self.windows.items():
            n_pieces = _prefix_pieces(w, max_tokens)
            out[d] = int(w.piece_document[n_pieces - 1]) + 1
        return out

    def tokens(self, max_tokens: int | None = None) -> dict[str, int]:
        """Scored tokens per domain within a token budget."""
        return {d: w.prefix(max_tokens)[1] for d, w in self.windows.items()}

    @property
    def domains(self) -> list[str]:
        return list(self.windows)

    @classmethod
    def from_pool_data(
        cls,
        data_dir: Path,
        domains: list[str],
        bos: int,
        seq_len: int,
        max_tokens: int | None,
        split: str = "search",
        targets: list[str] | tuple[str, ...] = (),
    ) -> HeldoutSet:
        """`max_tokens` None reads every piece of the split. `targets` adds those target
        sets (keyed ``target/<name>``) after the domains."""
        windows = {
            d: build_windows(Shard.open(data_dir / d, split), bos, seq_len, max_tokens)
            for d in domains
        }
        for name in targets:
            shard = Shard.open(data_dir / TARGETS_DIR / name, split)
            windows[TARGET_PREFIX + name] = build_windows(shard, bos, seq_len, max_tokens)
        return cls(windows, max_tokens, split)


def _prefix_pieces(windows: DomainWindows, max_tokens: int | None) -> int:
    """How many pieces the shortest prefix reaching `max_tokens` holds."""
    n_windows = windows.prefix(max_tokens)[0]
    return int(np.searchsorted(windows.piece_end, n_windows, side="left")) + 1


@dataclass
class DocumentScores:
    """One domain's scored held-out documents: per document, the summed negative
    log-likelihood (nats), the scored tokens and the UTF-8 bytes."""

    nll: np.ndarray
    tokens: np.ndarray
    bytes: np.ndarray

    def metrics(self, domain: str, counts: np.ndarray | None = None) -> dict[str, float]:
        """loss / ppl / bpb over the documents, each counted `counts` times (a bootstrap
        resample; None counts each once), named after `domain` (a domain, or a target
        set's ``target/<name>`` key: see `metric_prefix`)."""
        if counts is None:
            nll, tokens, nbytes = self.nll.sum(), self.tokens.sum(), self.bytes.sum()
        else:
            nll, tokens, nbytes = counts @ self.nll, counts @ self.tokens, counts @ self.bytes
        loss = float(nll / tokens)
        prefix = metric_prefix(domain)
        return {
            f"{prefix}/loss": loss,
            f"{prefix}/ppl": math.exp(min(loss, 700.0)),
            f"{prefix}/bpb": float(nll / (nbytes * math.log(2))),
        }


def window_lengths(windows: DomainWindows, n_windows: int) -> np.ndarray:
    """Real (unpadded) input length of each of the first `n_windows`: every window's last
    input position predicts a scored token, so it ends after its last label."""
    scored = (windows.labels[:n_windows] != -100).numpy()
    return windows.labels.shape[1] - np.argmax(scored[:, ::-1], axis=1)


def token_batches(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Window indices grouped into batches of at most `batch_tokens` tokens (rows x the
    longest row, at least one row), longest windows first so that a batch's windows have
    nearly the same length and trimmed padding wastes little."""
    order = np.argsort(-lengths, kind="stable")
    batches, lo = [], 0
    while lo < len(order):
        rows = max(1, batch_tokens // int(lengths[order[lo]]))
        batches.append(order[lo : lo + rows])
        lo += rows
    return batches


def head_parts(model):
    """(base model, output projection) when logits are exactly ``head(base(x))``, so the
    head can be applied to a few positions at a time; None for architectures that scale
    or cap their logits (and for anything not shaped like a transformers causal LM)."""
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    cfg = getattr(model, "config", None)
    if base is None or base is model or not isinstance(head, torch.nn.Linear):
        return None
    if any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in _LOGIT_TRANSFORMS):
        return None
    return base, head


# Config keys of architectures whose logits are not simply ``lm_head(hidden)``.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_mult")


def chunk_positions(vocab_size: int) -> int:
    """Positions whose full-vocabulary logits are materialised at a time (about 16M
    logits, 64 MB in fp32)."""
    return max(64, (1 << 24) // max(1, vocab_size))


def chunked_nll(hidden: torch.Tensor, labels: torch.Tensor, head, chunk: int) -> torch.Tensor:
    """Per-position negative log-likelihood (fp32) of the scored positions of `hidden`
    (``(N, H)``, flattened) under ``head(hidden)``, `chunk` positions at a time, so the
    logits of all positions never exist at once. `head` is a module or a callable."""
    out = []
    for lo in range(0, hidden.shape[0], chunk):
        logits = head(hidden[lo : lo + chunk])
        out.append(
            torch.nn.functional.cross_entropy(
                logits.float(), labels[lo : lo + chunk], reduction="none"
            )
        )
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


@torch.no_grad()
def window_nll(
    model,
    windows: DomainWindows,
    n_windows: int,
    device: torch.device,
    precision: str = "auto",
    batch_size: int = 16,
    batch_tokens: int | None = None,
) -> np.ndarray:
    """Negative log-likelihood (nats, float64) of each of the first `n_windows`.

    Windows are batched by tokens, not rows: at most `batch_tokens` tokens per batch
    (default ``batch_size x seq_len``, today's worst case), longest first, with padding
    trimmed to each batch's longest window; the LM head and cross-entropy run on a chunk
    of scored positions at a time (`chunked_nll`), so a batch's full-vocabulary logits
    never exist at once. Each window's number is the same as scoring it alone, up to
    float rounding (a causal model's positions never see what follows them)."""
    out = np.zeros(n_windows, dtype=np.float64)
    if n_windows == 0:
        return out
    seq_len = windows.input_ids.shape[1]
    lengths = window_lengths(windows, n_windows)
    parts = head_parts(model)
    for rows in token_batches(lengths, batch_tokens or batch_size * seq_len):
        width = int(lengths[rows[0]])
        ids = windows.input_ids[rows, :width].to(device)
        lab = windows.labels[rows, :width].to(device)
        scored = lab != -100
        with autocast(device, precision):
            if parts is None:
                hidden = model(input_ids=ids).logits
                head = torch.nn.Identity()
            else:
                hidden = parts[0](input_ids=ids).last_hidden_state
                head = parts[1]
            chunk = chunk_positions(getattr(model.config, "vocab_size", 1))
            nll = chunked_nll(hidden[scored], lab[scored], head, chunk)
        per_row = torch.zeros(len(rows), dtype=torch.float64, device=nll.device)
        row_of = torch.arange(len(rows), device=device).unsqueeze(1).expand_as(lab)[scored]
        per_row.index_add_(0, row_of, nll.double())
        out[rows] = per_row.cpu().numpy()
    return out


def heldout_nll(
    model,
    windows: DomainWindows,
    n_windows: int,
    device: torch.device,
    precision: str = "auto",
    batch_size: int = 16,
) -> float:
    """Sum of negative log-likelihoods (nats, float64) over the first `n_windows`."""
    return float(window_nll(model, windows, n_windows, device, precision, batch_size).sum())


def document_scores(
    model,
    heldout: HeldoutSet,
    device: torch.device | str = "cpu",
    precision: str = "auto",
    batch_size: int = 16,
    max_tokens: int | None = None,
    domains: list[str] | None = None,
) -> dict[str, DocumentScores]:
    """Per-domain, per-document sums of the scored held-out pieces (whole pieces up to
    `max_tokens` per domain, as `heldout_metrics`)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    out = {}
    for d in domains or heldout.domains:
        w = heldout.windows[d]
        n_windows = w.prefix(max_tokens)[0]
        n_pieces = _prefix_pieces(w, max_tokens)
        per_window = window_nll(model, w, n_windows, device, precision, batch_size)
        # Windows -> pieces -> documents, by cumulative sums at the boundaries.
        piece_nll = np.add.reduceat(per_window, np.r_[0, w.piece_end[: n_pieces - 1]])
        tokens = np.diff(np.r_[0, w.piece_tokens[:n_pieces]])
        nbytes = np.diff(np.r_[0, w.piece_bytes[:n_pieces]])
        doc = w.piece_document[:n_pieces]
        n_docs = int(doc[-1]) + 1
        out[d] = DocumentScores(
            nll=np.bincount(doc, weights=piece_nll, minlength=n_docs),
            tokens=np.bincount(doc, weights=tokens, minlength=n_docs),
            bytes=np.bincount(doc, weights=nbytes, minlength=n_docs),
        )
    if was_training:
        model.train()
    return out


def metrics_from_documents(
    scores: Mapping[str, DocumentScores], counts: Mapping[str, np.ndarray] | None = None
) -> dict[str, float]:
    """Every domain's metrics from its document scores; `counts` (domain -> how often each
    document is drawn) evaluates a bootstrap resample instead."""
    out: dict[str, float] = {}
    for d, s in scores.items():
        out.update(s.metrics(d, None if counts is None else counts[d]))
    return out


def heldout_metrics(
    model,
    heldout: HeldoutSet,
    device: torch.device | str = "cpu",
    precision: str = "auto",
    batch_size: int = 16,
    max_tokens: int | None = None,
    domains: list[str] | None = None,
) -> dict[str, float]:
    """Per-domain held-out loss, perplexity and bits per byte (see the module docstring).

    `max_tokens` lowers the per-domain budget below the one the set was built with
    (cheaper, noisier scores for successive halving)."""
    scores = document_scores(model, heldout, device, precision, batch_size, max_tokens, domains)
    return metrics_from_documents(scores)


def format_eval_table(rows: list[dict], domains: list[str], measured: dict | None = None) -> str:
    """`merge-mix eval`'s table: one row per mixture; held-out loss per domain, the mean
    over domains, mean bits per byte, then any benchmark metrics; then each mixture's
    mean-loss difference from the first, with its interval. `measured` names the split and
    its documents and tokens per domain."""
    extra = sorted({k for r in rows for k in r["metrics"] if not k.startswith("heldout/")})
    name_w = max(12, *(len(r["name"]) for r in rows)) + 2
    header = f"{'mixture':<{name_w}}" + "".join(f"{d[:11]:>12}" for d in domains)
    header += f"{'mean loss':>12}{'mean bpb':>10}" + "".join(f"{k[-24:]:>26}" for k in extra)
    title = "held-out loss (nats/token) per domain"
    if measured:
        docs = ", ".join(
            f"{d} {measured['documents'][d]} docs/{measured['tokens'][d]:,} tokens" for d in domains
        )
        title += f", {measured['split']} split ({docs})"
    lines = [title, header]
    for r in rows:
        m = r["metrics"]
        losses = [m[f"heldout/{d}/loss"] for d in domains]
        bpbs = [m[f"heldout/{d}/bpb"] for d in domains]
        line = f"{r['name']:<{name_w}}" + "".join(f"{v:>12.4f}" for v in losses)
        line += f"{np.mean(losses):>12.4f}{np.mean(bpbs):>10.4f}"
        line += "".join(f"{m[k]:>26.4f}" for k in extra)
        lines.append(line)
    lines.append("")
    lines.append("merge weights -> effective data mixture")
    for r in rows:
        w = " ".join(f"{d}={r['merge_weights'][d]:.3f}" for d in domains)
        e = " ".join(f"{d}={r['effective_mixture'][d]:.3f}" for d in domains)
        lines.append(f"{r['name']:<{name_w}}{w}  ->  {e}")
    compared = [r for r in rows if r.get("mean_loss_vs_first")]
    if compared:
        lines.append("")
        lines.append(
            "mean held-out loss vs the first mixture (95% paired bootstrap over documents)"
        )
        for r in compared:
            lines.append(f"{r['name']:<{name_w}}{r['mean_loss_vs_first']['sentence']}")
    return "\n".join(lines)
