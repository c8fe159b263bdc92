"""The memory model: bf16 stacks, the streaming merge's file reads, token-budget batches
with chunked cross-entropy, per-batch backprop in the gradient search, the memory plan."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from merge_mix import evaluate
from merge_mix.errors import MergeMixError
from merge_mix.evaluate import (
    HeldoutSet,
    document_scores,
    token_batches,
    window_lengths,
    window_nll,
)
from merge_mix.merge import merger_for_pool
from merge_mix.pool import Pool
from merge_mix.proxy import ProxyScorer, memory_plan
from merge_mix.search.gradient import differentiable_metrics, training_slice

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from memory_check import padded_nll  # noqa: E402  (the evaluator before token batching)

W = np.array([0.2, 0.5, 0.3])


@pytest.fixture(scope="module")
def pool(tiny_pool):
    return Pool.open(tiny_pool)


@pytest.fixture(scope="module")
def merger(pool):
    return merger_for_pool(pool)


@pytest.fixture(scope="module")
def heldout(pool):
    return HeldoutSet.from_pool_data(pool.data_dir, pool.domains, pool.bos_id, pool.seq_len, 3000)


def test_token_batches_hold_at_most_the_budget_and_every_window_once():
    lengths = np.array([5, 64, 64, 17, 3, 64, 40])
    batches = token_batches(lengths, 128)
    assert sorted(np.concatenate(batches).tolist()) == list(range(7))
    for rows in batches:
        assert len(rows) * lengths[rows].max() <= 128
    assert [len(b) for b in batches] == [2, 2, 3]  # 64+64 | 64+40 (64 wide) | 17, 5, 3


def mixed_windows(pool, seed: int = 0) -> evaluate.DomainWindows:
    """Windows of pieces of mixed lengths (3 to 150 tokens, seq_len 64) cut from the
    tiny pool's prose: the tiny pool's own pieces are all longer than its context, so
    its windows are all full and need no padding."""
    from merge_mix.tokens import Shard

    tokens = np.concatenate(
        [Shard.open(pool.data_dir / "prose", "search").piece(i) for i in range(8)]
    )
    rng = np.random.default_rng(seed)
    inputs, labels, ends, lo = [], [], [], 0
    sizes = rng.integers(3, 150, size=30)
    for n in sizes:
        for inp, lab in evaluate.rolling_windows(tokens[lo : lo + n], pool.bos_id, pool.seq_len):
            pad = pool.seq_len - len(inp)
            inputs.append(np.pad(inp, (0, pad), constant_values=pool.bos_id))
            labels.append(np.pad(lab, (0, pad), constant_values=-100))
        ends.append(len(inputs))
        lo += n
    return evaluate.DomainWindows(
        input_ids=torch.from_numpy(np.stack(inputs)),
        labels=torch.from_numpy(np.stack(labels)),
        piece_end=np.asarray(ends),
        piece_tokens=np.cumsum(sizes),
        piece_bytes=np.cumsum(sizes) * 3,
        piece_document=np.arange(30),
    )


def test_window_lengths_are_the_unpadded_inputs(pool):
    w = mixed_windows(pool)
    n = len(w.input_ids)
    lengths = window_lengths(w, n)
    assert lengths.max() == w.input_ids.shape[1] and lengths.min() < lengths.max()
    # The padding after each window's length is never scored.
    for i in range(n):
        assert (w.labels[i, lengths[i] :] == -100).all()
        assert w.labels[i, lengths[i] - 1] != -100


@pytest.mark.parametrize("batch_tokens", [None, 200, 1])
def test_token_batched_chunked_evaluator_equals_the_padded_one(
    pool, merger, heldout, batch_tokens, monkeypatch
):
    # Small chunks of positions, so the LM head really runs in several pieces.
    monkeypatch.setattr(evaluate, "chunk_positions", lambda vocab: 37)
    model = merger.merge(W)
    worst = 0.0
    for w in [*heldout.windows.values(), mixed_windows(pool, 1)]:
        n = w.prefix(None)[0]
        new = window_nll(model, w, n, torch.device("cpu"), "fp32", 16, batch_tokens)
        old = padded_nll(model, w, n)
        worst = max(worst, float(np.max(np.abs(new - old) / np.abs(old))))
    # Measured: 2.3e-9 (default budget), 8.2e-10 (200 tokens), 1.2e-7 (one window a
    # batch): float32 rounding of different matmul shapes.
    assert worst < 1e-6


def test_document_scores_unchanged_by_token_batching(pool, merger, heldout):
    model = merger.merge(W)
    scores = document_scores(model, heldout)
    for d, s in scores.items():
        w = heldout.windows[d]
        old = padded_nll(model, w, w.prefix(None)[0])
        assert s.nll.sum() == pytest.approx(old.sum(), rel=1e-6)
        assert s.tokens.sum() == w.prefix(None)[1]


def test_chunked_head_is_exact_for_an_untied_llama(heldout, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setattr(evaluate, "chunk_positions", lambda vocab: 50)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight.data_ptr() != embed.weight.data_ptr()
    assert evaluate.head_parts(model) is not None
    w = heldout.windows["c"]
    n = min(w.prefix(None)[0], 24)
    new = window_nll(model, w, n, torch.device("cpu"), "fp32")
    old = padded_nll(model, w, n)
    assert np.max(np.abs(new - old) / old) < 2e-6


def test_models_with_transformed_logits_fall_back_to_full_logits():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config)
    assert evaluate.head_parts(model) is not None
    model.config.final_logit_softcapping = 30.0
    assert evaluate.head_parts(model) is None


def test_streaming_merge_is_bit_identical_and_opens_each_file_once(pool, merger, monkeypatch):
    import safetensors

    resident = {k: v.clone() for k, v in merger.merge(W).state_dict().items()}
    streamed = merger_for_pool(pool, stream=True)
    opened: list[str] = []
    real = safetensors.safe_open

    def counting(path, *args, **kwargs):
        opened.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", counting)
    merged = streamed.merge(W).state_dict()
    for name, tensor in merged.items():
        assert torch.equal(tensor, resident[name]), name
    files = [str(f) for fs in streamed._files.values() for f in fs]
    assert sorted(opened) == sorted(files)  # every file once, nothing else
    assert len(files) == len(pool.domains) + 1


def test_stacks_live_on_the_model_device(merger):
    device = next(merger.model.parameters()).device
    assert merger.stacks and all(s.device == device for s in merger.stacks.values())


def test_bf16_stack_halves_memory_and_its_error_is_small(pool, merger, heldout):
    half = merger_for_pool(pool, stack_dtype="bf16")
    assert all(s.dtype == torch.bfloat16 for s in half.stacks.values())
    full_bytes = sum(s.nbytes for s in merger.stacks.values())
    assert sum(s.nbytes for s in half.stacks.values()) * 2 == full_bytes
    # One-hot merges return the bf16-rounded component exactly (fp32 accumulation).
    one_hot = half.merge(np.eye(3)[1])
    assert all(p.dtype == torch.float32 for p in one_hot.parameters())
    ref = {k: v.clone() for k, v in merger.merge(W).state_dict().items()}
    a = metric_losses(merger.model, heldout)
    got = half.merge(W).state_dict()
    diff = max(float((got[k] - ref[k]).abs().max()) for k in ref)
    b = metric_losses(half.model, heldout)
    loss_diff = max(abs(a[d] - b[d]) for d in a)
    # Measured on the tiny pool: weights 2.7e-3 apart at most (bf16 keeps 8 bits of
    # mantissa), held-out loss 9.0e-5 nats.
    assert 0 < diff < 5e-3
    assert loss_diff < 5e-4


def metric_losses(model, heldout) -> dict[str, float]:
    scores = document_scores(model, heldout)
    return {d: float(s.nll.sum() / s.tokens.sum()) for d, s in scores.items()}


def test_gradient_per_batch_equals_one_graph_over_the_slice(pool):
    from torch.func import functional_call

    scorer = ProxyScorer(pool, heldout_tokens=1000, batch_size=2, notice=lambda m: None)
    slices = training_slice(scorer, 1200)
    w = torch.tensor(W, dtype=torch.float64, requires_grad=True)
    metrics = differentiable_metrics(scorer, slices, w)
    total = sum(metrics[f"heldout/{d}/loss"] for d in scorer.domains)
    (grad,) = torch.autograd.grad(total, w)
    # Reference: one graph over the whole slice, full logits, a single backward.
    w2 = torch.tensor(W, dtype=torch.float64, requires_grad=True)
    params = scorer.differentiable_params(w2.to(torch.float32))
    ref = torch.zeros((), dtype=torch.float64)
    for win in slices.values():
        n, tokens, _ = win.prefix(None)
        logits = functional_call(scorer.merger.model, params, (win.input_ids[:n],)).logits
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), win.labels[:n].reshape(-1), reduction="sum"
        )
        ref = ref + nll.double() / tokens
    (ref_grad,) = torch.autograd.grad(ref, w2)
    assert float(total.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    # Measured: 8.4e-7 apart at most, on derivatives of 0.43 to 0.82 (values 4.4e-9 rel).
    assert torch.allclose(grad, ref_grad, rtol=0, atol=1e-5)


def test_memory_plan_matches_the_stack_and_refuses_what_cannot_fit(pool, merger, monkeypatch):
    from merge_mix import proxy

    plan = memory_plan(pool, "cpu")
    assert plan.stack == sum(s.nbytes for s in merger.stacks.values())
    n_params = sum(p.numel() for p in merger.model.parameters())
    assert plan.model == n_params * 4
    assert memory_plan(pool, "cpu", stack_dtype="bf16").stack * 2 == plan.stack
    assert memory_plan(pool, "cpu", stream=True).stack < plan.stack / 3
    assert plan.describe().startswith("memory: resident fp32 stack on cpu: stack ")
    # Announced once, before the first scoring (errors found before that stay one line).
    lines: list[str] = []
    scorer = ProxyScorer(pool, heldout_tokens=200, notice=lines.append)
    assert lines == []
    scorer.score(W)
    scorer.score(W)
    assert len(lines) == 1 and lines[0].startswith("memory: resident fp32 stack on cpu")
    monkeypatch.setattr(proxy, "available_memory", lambda device: 1000)
    with pytest.raises(MergeMixError, match=r"^memory: resident fp32 stack needs .*--stream$"):
        ProxyScorer(pool)


def test_available_memory_on_cpu_is_read():
    from merge_mix.proxy import available_memory

    free = available_memory(torch.device("cpu"))
    assert free is None or free > 0
