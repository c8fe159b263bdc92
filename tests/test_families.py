"""Pretrained bases of the common Hugging Face families, end to end on tiny random models.

Each family gets a tiny, randomly initialised base saved locally (no hub) with the kind of
tokenizer it ships, trained here with `tokenizers`: a byte-level BPE whose post-processor
adds BOS (Llama 3), a SentencePiece-style Unigram + Metaspace that adds BOS (Mistral,
Gemma), a byte-level BPE without BOS (GPT-2, GPT-NeoX, Qwen2, OLMo 2). Between them the bases have
untied and tied heads, grouped- and multi-query attention, sharded safetensors, bf16
storage and a non-default rope_theta. For each: a two-domain pool is built from the base,
a one-hot merge is a component bit for bit, our evaluator and lm-eval agree on bits per
byte (one BOS before every scored text), and an export reloads with the Auto classes and
scores the same.

`make_family_base` is also used by ``benchmarks/transformers_compat.py``.
"""

from __future__ import annotations

import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

VOCAB = 400  # tokenizer vocabulary; the models' embeddings are padded past it


@dataclass(frozen=True)
class Family:
    name: str
    tokenizer: str  # "bpe_bos", "unigram_bos" or "bpe"
    tokenizer_class: str  # what the family's tokenizer_config.json names
    bos: str | None
    eos: str
    dtype: torch.dtype = torch.float32
    shard: str | None = None  # save_pretrained(max_shard_size=...)
    rope_theta: float | None = None

    @property
    def adds_bos(self) -> bool:
        return self.tokenizer.endswith("_bos")


FAMILIES = [
    # Llama 3: byte-level BPE adding BOS, GQA, untied head, rope_theta 500000, sharded.
    Family("llama", "bpe_bos", "PreTrainedTokenizerFast", "<|begin_of_text|>",
           "<|end_of_text|>", shard="40KB", rope_theta=500000.0),
    # Qwen2: byte-level BPE, no BOS token at all (EOS opens documents), GQA, tied, bf16.
    Family("qwen2", "bpe", "Qwen2Tokenizer", None, "<|endoftext|>", dtype=torch.bfloat16),
    # Mistral: SentencePiece-style tokenizer adding <s>, multi-query attention, untied.
    Family("mistral", "unigram_bos", "PreTrainedTokenizerFast", "<s>", "</s>"),
    # Pythia / GPT-NeoX: byte-level BPE, BOS = EOS not added, partial rotary, untied.
    Family("gpt_neox", "bpe", "GPTNeoXTokenizer", "<|endoftext|>", "<|endoftext|>"),
    # GPT-2: BPE without BOS, learned positions, tied.
    Family("gpt2", "bpe", "GPT2Tokenizer", "<|endoftext|>", "<|endoftext|>"),
    # Gemma: SentencePiece-style adding <bos>, multi-query attention, tied, bf16, sharded.
    Family("gemma", "unigram_bos", "PreTrainedTokenizerFast", "<bos>", "<eos>",
           dtype=torch.bfloat16, shard="40KB"),
    # OLMo 2: byte-level BPE without BOS (GPT-2 class, <|endoftext|> for both), GQA,
    # q/k RMS norms after attention and MLP (not before), untied head, rope_theta 500000.
    Family("olmo2", "bpe", "GPT2Tokenizer", "<|endoftext|>", "<|endoftext|>",
           rope_theta=500000.0),
]  # fmt: skip


def _sample_texts() -> list[str]:
    from pydoc_data.topics import topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text() for p in sorted((stdlib / "json").glob("*.py"))]
    return texts + [topics[k] for k in sorted(topics)[:60]]


def _tokenizer(family: Family):
    """A `tokenizers.Tokenizer` of the family's kind, trained on a small local sample."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = list(dict.fromkeys(t for t in (family.bos, family.eos) if t))
    if family.tokenizer.startswith("bpe"):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        specials = ["<unk>", *specials]
        trainer = trainers.UnigramTrainer(
            vocab_size=VOCAB, special_tokens=specials, unk_token="<unk>", show_progress=False
        )
    tok.train_from_iterator(_sample_texts(), trainer=trainer)
    if family.adds_bos:
        bos = (family.bos, tok.token_to_id(family.bos))
        tok.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos} $B", special_tokens=[bos]
        )
    elif family.tokenizer == "bpe":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _config(family: Family, vocab: int):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    if family.name == "llama":
        return tf.LlamaConfig(
            **common, intermediate_size=64, num_key_value_heads=2, tie_word_embeddings=False,
            rope_theta=family.rope_theta, max_position_embeddings=128,
        )  # fmt: skip
    if family.name == "qwen2":
        return tf.Qwen2Config(
            **common, intermediate_size=64, num_key_value_heads=2, tie_word_embeddings=True,
            max_position_embeddings=128, use_sliding_window=False,
        )  # fmt: skip
    if family.name == "mistral":
        return tf.MistralConfig(
            **common, intermediate_size=64, num_key_value_heads=1, tie_word_embeddings=False,
            max_position_embeddings=128, sliding_window=None,
        )  # fmt: skip
    if family.name == "gpt_neox":
        return tf.GPTNeoXConfig(
            **common, intermediate_size=64, rotary_pct=0.5, rotary_emb_base=20000,
            max_position_embeddings=128, tie_word_embeddings=False,
        )  # fmt: skip
    if family.name == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    if family.name == "gemma":
        return tf.GemmaConfig(
            **common, intermediate_size=64, num_key_value_heads=1, head_dim=8,
            max_position_embeddings=128, tie_word_embeddings=True,
        )  # fmt: skip
    if family.name == "olmo2":
        return tf.Olmo2Config(
            **common, intermediate_size=64, num_key_value_heads=2, tie_word_embeddings=False,
            rope_theta=family.rope_theta, max_position_embeddings=128,
        )  # fmt: skip
    raise ValueError(family.name)


def make_family_base(family: Family, out: Path, seed: int = 0) -> Path:
    """A tiny random `family` base with its kind of tokenizer, saved to `out` as a
    pretrained checkpoint would be (the family's dtype, shards and tokenizer class)."""
    from transformers import AutoModelForCausalLM

    tok = _tokenizer(family)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    specials = {"eos_token": family.eos}
    if family.bos is not None:
        specials["bos_token"] = family.bos
    if family.tokenizer.startswith("unigram"):
        specials["unk_token"] = "<unk>"
    (out / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": family.tokenizer_class, **specials})
    )
    vocab = -(-tok.get_vocab_size() // 64) * 64
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(_config(family, vocab))
    model.to(family.dtype).save_pretrained(str(out), max_shard_size=family.shard or "10GB")
    return out


def family_spec(root: Path, base: Path, output: Path) -> dict:
    """A two-domain pool spec over `base` with budgets that build in seconds."""
    from conftest import tiny_spec_dict

    spec = tiny_spec_dict(root, output=str(output))
    spec["name"] = "fam"
    spec["domains"] = {d: spec["domains"][d] for d in ("c", "prose")}
    spec["domains"]["c"]["max_bytes"] = 150_000
    spec["domains"]["prose"]["max_bytes"] = 200_000
    spec["tokenizer"] = {}
    spec["model"] = {"pretrained": str(base), "seq_len": 64}
    spec["training"] = {
        "component_tokens": 4096,
        "batch_size": 8,
        "lr": 5e-3,
        "warmup_steps": 2,
        "eval_every": 0,
        "eval_tokens": 1024,
        "checkpoint_every": 100,
        "device": "cpu",
    }
    return spec


@pytest.fixture(scope="module", params=FAMILIES, ids=[f.name for f in FAMILIES])
def family_pool(request, tmp_path_factory):
    from conftest import write_spec

    from merge_mix.config import load_spec
    from merge_mix.pool import Pool
    from merge_mix.pool_build import build_pool

    family = request.param
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if family.name not in CONFIG_MAPPING_NAMES:  # OLMo 2 came with transformers 4.47
        pytest.skip(f"this transformers has no model type {family.name!r}")
    root = tmp_path_factory.mktemp(family.name)
    base = make_family_base(family, root / "pretrained")
    spec = family_spec(root, base, root / "pool")
    assert build_pool(load_spec(write_spec(root, spec)), show_progress=False) is not None
    return family, base, Pool.open(root / "pool"), root


def _texts(pool, domain: str, split: str = "search") -> list[str]:
    path = pool.data_dir / domain / f"{split}.jsonl"
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_pool_shards_hold_one_bos_before_each_piece(family_pool):
    """Shards hold ``BOS text EOS`` for every kind of tokenizer: a tokenizer that adds BOS
    itself adds nothing more, and one without BOS opens pieces with EOS."""
    from merge_mix.tokens import Shard, load_tokenizer

    family, base, pool, _ = family_pool
    tokenizer = load_tokenizer(pool.tokenizer_dir)
    expected_bos = family.bos if family.bos is not None else family.eos
    assert pool.bos_id == tokenizer.convert_tokens_to_ids(expected_bos)
    # The pool's tokenizer encodes as the base's own does.
    theirs = load_tokenizer(base)
    for d in pool.domains:
        shard = Shard.open(pool.data_dir / d, "search")
        for i, text in enumerate(_texts(pool, d)[:5]):
            start = int(shard.index[i, 0])
            assert int(shard.tokens[start - 1]) == pool.bos_id
            plain = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert shard.piece(i).tolist() == plain
            assert theirs(text, add_special_tokens=False)["input_ids"] == plain
            with_specials = tokenizer(text)["input_ids"]
            assert with_specials == ([pool.bos_id, *plain] if family.adds_bos else plain)


def test_base_copy_and_one_hot_merge_are_exact(family_pool):
    """The base is the pretrained weights (bf16 upcast exactly to fp32) and a one-hot
    merge reproduces each component bit for bit."""
    from merge_mix.merge import merger_for_pool
    from merge_mix.model import load_model

    family, base, pool, _ = family_pool
    ours = load_model(pool.base_dir).state_dict()
    theirs = load_model(base).state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    if family.shard:
        assert len(list(base.glob("*.safetensors"))) > 1
    merger = merger_for_pool(pool)
    for k, d in enumerate(pool.domains):
        merged = merger.merge(np.eye(len(pool.domains))[k]).state_dict()
        component = load_model(pool.component_dir(d)).state_dict()
        assert merged.keys() == component.keys()
        assert all(torch.equal(merged[n], component[n]) for n in merged), d


def test_evaluator_agrees_with_lm_eval(family_pool):
    """Rolling bits per byte from lm-eval (tasks made from the stored original text) equals
    our evaluator's on the same pieces: both see exactly one BOS before each text."""
    from merge_mix.evaluate import HeldoutSet, heldout_metrics
    from merge_mix.lmeval import evaluate_tasks, make_tasks
    from merge_mix.merge import merger_for_pool
    from merge_mix.tokens import load_tokenizer

    family, _, pool, root = family_pool
    tasks = root / "tasks"
    make_tasks(pool.path, tasks, max_docs_per_domain=12, n_choices=2)
    tokenizer = load_tokenizer(pool.tokenizer_dir)
    model = merger_for_pool(pool).merge(np.array([0.6, 0.4]))
    heldout = HeldoutSet.from_pool_data(
        pool.data_dir, pool.domains, pool.bos_id, pool.seq_len, max_tokens=2500
    )
    ours = heldout_metrics(model, heldout, "cpu")
    for d in pool.domains:
        rows = [json.loads(x) for x in (tasks / "fam" / "data" / f"mm_fam_{d}_ppl.jsonl").open()]
        texts = _texts(pool, d)
        assert all(r["text"] == texts[r["piece"]] for r in rows)  # the original text
        k = len(heldout.windows[d].piece_end)
        assert 1 < k <= len(rows)
        theirs = evaluate_tasks(
            model, tokenizer, [f"mm_fam_{d}_ppl"], include_path=tasks, limit=k,
            max_length=pool.seq_len,
        )  # fmt: skip
        a, b = ours[f"heldout/{d}/bpb"], theirs[f"lmeval/mm_fam_{d}_ppl/bits_per_byte"]
        assert abs(a - b) / a < 1e-5, (family.name, d, a, b)
    # Stock lm-eval: the export's recorded arguments reproduce us; its default does not
    # when the tokenizer adds BOS itself (it then scores BOS BOS t_0 ...).
    d = pool.domains[1]
    k = len(heldout.windows[d].piece_end)
    stock = {
        "ours": _stock_bpb(model, tokenizer, tasks, f"mm_fam_{d}_ppl", k, pool.seq_len,
                           add_bos_token=False, prefix_token_id=pool.bos_id),
        "default": _stock_bpb(model, tokenizer, tasks, f"mm_fam_{d}_ppl", k, pool.seq_len),
    }  # fmt: skip
    a = ours[f"heldout/{d}/bpb"]
    assert stock["ours"] == pytest.approx(a, rel=1e-5)
    if family.adds_bos:
        assert abs(stock["default"] - a) / a > 1e-4, (family.name, stock, a)
    else:
        assert stock["default"] == pytest.approx(a, rel=1e-5)


def _stock_bpb(model, tokenizer, tasks, task, limit, max_length, **hflm_args) -> float:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=max_length, **hflm_args)
    results = simple_evaluate(
        model=lm,
        tasks=[task],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        limit=limit,
        bootstrap_iters=0,
    )
    return results["results"][task]["bits_per_byte,none"]


def test_export_reloads_with_auto_classes_and_scores_the_same(family_pool):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from merge_mix.evaluate import HeldoutSet, heldout_metrics
    from merge_mix.export import export_proxy
    from merge_mix.merge import merger_for_pool
    from merge_mix.tokens import load_tokenizer, special_ids

    family, _, pool, root = family_pool
    merger = merger_for_pool(pool)
    weights = np.array([0.3, 0.7])
    out = export_proxy(pool, merger, weights, root / "export", force=True)
    heldout = HeldoutSet.from_pool_data(
        pool.data_dir, pool.domains, pool.bos_id, pool.seq_len, max_tokens=2500
    )
    merged = heldout_metrics(merger.merge(weights), heldout, "cpu")
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    assert model.dtype == torch.float32
    reloaded = heldout_metrics(model, heldout, "cpu")
    assert reloaded == pytest.approx(merged, rel=1e-6, abs=1e-7)
    tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    pool_tok = load_tokenizer(pool.tokenizer_dir)
    assert special_ids(tokenizer) == special_ids(pool_tok)
    text = _texts(pool, "c")[0]
    assert tokenizer(text)["input_ids"] == pool_tok(text)["input_ids"]
    record = json.loads((out / "merge_mix_export.json").read_text())
    assert record["lm_eval_model_args"] == f"add_bos_token=False,prefix_token_id={pool.bos_id}"
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "PreTrainedTokenizerFast"
    config = json.loads((out / "config.json").read_text())
    if family.rope_theta is not None:  # the 4.x key, and the 5.x one when 5.x saved it
        assert config["rope_theta"] == family.rope_theta
        assert config.get("rope_parameters", config)["rope_theta"] == family.rope_theta
        reread = AutoConfig.from_pretrained(str(out))
        rope = getattr(reread, "rope_parameters", None) or {"rope_theta": reread.rope_theta}
        assert rope["rope_theta"] == family.rope_theta
    if family.name == "gpt_neox":
        assert (config["rotary_pct"], config["rotary_emb_base"]) == (0.5, 20000)


def test_legacy_config_keys_for_transformers_4():
    from merge_mix.model import add_legacy_config_keys

    llama3 = {
        "model_type": "llama",
        "dtype": "bfloat16",
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0},
    }
    out = add_legacy_config_keys(llama3)
    assert out["rope_theta"] == 500000.0 and out["torch_dtype"] == "bfloat16"
    assert out["rope_scaling"] == {"factor": 8.0, "rope_type": "llama3", "type": "llama3"}
    gemma3 = {
        "rope_parameters": {
            "full_attention": {"rope_theta": 1e6, "rope_type": "default"},
            "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"},
        }
    }
    out = add_legacy_config_keys(gemma3)
    assert (out["rope_theta"], out["rope_local_base_freq"]) == (1e6, 1e4)
    assert "rope_scaling" not in out
    kept = add_legacy_config_keys({"rope_theta": 1.0, "rope_parameters": {"rope_theta": 2.0}})
    assert kept["rope_theta"] == 1.0
