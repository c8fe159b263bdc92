"""Issue 13's memory goals at scale: the resident memory of a search on a pool of 4
components of 104.6M parameters stored in bf16, the streaming merge's bytes read against
the files' sizes, and the token-batched evaluator against the old padded one on that model.

    python benchmarks/memory_scale.py OUT [--tokenizer DIR] [--json PATH]

No training: OUT/pool gets a randomly initialised Llama of 104.6M parameters (hidden 768,
12 layers, intermediate 2304, vocabulary 16,384, tied embeddings, ``seq_len`` 512; the GPU
check's model) saved in bf16 as its pretrained base (``model.pretrained``, with the
tokenizer of ``--tokenizer``, by default the demo pool's), 4 built-in domains of local
text, and 4 components made by adding seeded Gaussian noise (std ``--scale``) to the base,
each brought in with `merge_mix.pool_import.import_model` (``merge-mix pool import``).
Built once, reused by later runs. Then each measurement runs in a fresh process
(``--part``), so that its peak resident set is its own:

- ``resident``: `ProxyScorer` with its default (``auto``, here bf16) stack; the process's
  resident set (``VmRSS``, peak ``VmHWM``, reset per phase through
  ``/proc/self/clear_refs``; anonymous memory ``RssAnon`` sampled every 5 ms) before and
  after the stack is built, and while a few mixtures are merged and scored, against the
  memory plan's formula (stack ``(K + 1) x P x 2``, model ``P x 4``, activations);
- ``stream``: the streaming merger; files opened and tensor bytes read per merge
  (counted through ``safetensors.safe_open``) against the files' sizes, its resident set,
  and whether it equals the resident bf16 stack's merge bit for bit;
- ``evaluator``: tokens scored per second by `merge_mix.evaluate.window_nll` against
  ``memory_check.padded_nll`` (the evaluator before token batching) on the base, for two
  sets of documents of mixed lengths (``memory_check.mixed_windows``' pieces, and the
  ``config`` domain's search split as it is), alternated A B A B ... with one torch
  thread; the median ratio, the load average, the largest relative difference per window.
  With ``--vocab N`` the model is the base's shape with an N-token vocabulary, randomly
  initialised (e.g. 128,256, Llama 3's: the LM head's share of a real base's work).

Linux only (``/proc/self/status``). Prints each part's figures; ``--json`` writes them all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_header, tiny_pool_spec, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOMAINS = {"code": "python-stdlib", "c": "c-headers", "config": "config-files", "prose": "prose"}
MODEL = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=12,
    intermediate_size=2304,
    vocab_size=16_384,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)
SEQ_LEN = 512
MIXTURES = ([0.25, 0.25, 0.25, 0.25], [0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4])
PARTS = ("resident", "stream", "evaluator")


# ---------------------------------------------------------------------------------------
# The process's memory


def status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon and RssFile of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


class Peaks:
    """Peak VmHWM (exact, the kernel's), and the peaks of RssAnon (anonymous memory: the
    stack, the model, activations) and RssFile (mapped file pages: safetensors files are
    read through mmap) sampled every 5 ms, since the last `reset`."""

    def __init__(self) -> None:
        self.anon = self.file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            now = status()
            self.anon = max(self.anon, now["RssAnon"])
            self.file = max(self.file, now["RssFile"])

    def reset(self) -> None:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to VmRSS
        now = status()
        self.anon, self.file = now["RssAnon"], now["RssFile"]

    def read(self) -> dict[str, int]:
        now = status()
        return {
            **now,
            "peak_anon": max(self.anon, now["RssAnon"]),
            "peak_file": max(self.file, now["RssFile"]),
        }

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def mib(n: float) -> str:
    return f"{n / 1024**2:,.0f} MiB"


# ---------------------------------------------------------------------------------------
# The pool


def default_tokenizer(out: Path) -> Path:
    """The demo pool's tokenizer if built (4,096 tokens), else the tiny test pool's."""
    demo = ROOT / "pools" / "demo" / "tokenizer"
    if (demo / "tokenizer.json").is_file():
        return demo
    tiny = out / "tiny" / "pool" / "tokenizer"
    if not (tiny / "tokenizer.json").is_file():
        from merge_mix.cli import main as cli

        spec = tiny_pool_spec(out / "tiny")
        cli.main(
            ["train-components", str(spec), "--quiet", "--prepare-only"], standalone_mode=False
        )
    return tiny


def build(out: Path, tokenizer: Path | None, max_bytes: int, scale: float, seed: int) -> Path:
    """Build OUT/pool (see the module docstring) unless it is complete; return its path."""
    import torch
    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    from merge_mix.config import load_spec
    from merge_mix.model import quiet_transformers
    from merge_mix.pool import Pool, component_mixture
    from merge_mix.pool_build import build_pool
    from merge_mix.pool_import import import_model

    pool_dir = out / "pool"
    if (pool_dir / "manifest.json").is_file() and json.loads(
        (pool_dir / "manifest.json").read_text()
    ).get("complete"):
        return pool_dir
    quiet_transformers()
    tokenizer = tokenizer or default_tokenizer(out)
    tok = json.loads((tokenizer / "merge_mix_tokenizer.json").read_text())
    src = out / "src"
    base_dir = src / "base"
    torch.manual_seed(seed)
    config = LlamaConfig(**MODEL, bos_token_id=tok["bos_id"], eos_token_id=tok["eos_id"])
    model = LlamaForCausalLM(config).eval()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    model = model.to(torch.bfloat16)
    if not (base_dir / "config.json").is_file():
        print(f"base: {sum(p.numel() for p in original.values()):,} parameters -> {base_dir}")
        model.save_pretrained(str(base_dir), safe_serialization=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(tokenizer / f, base_dir / f)
    spec_doc = {
        "name": "memory-scale",
        "output_dir": "pool",
        "seed": seed,
        "domains": {
            name: {"sources": [{"builtin": b}], "max_bytes": max_bytes}
            for name, b in DOMAINS.items()
        },
        "data": {
            "heldout_fraction": 0.2,
            "heldout_max_documents": 100,
            "heldout_max_pieces": 2,
            "max_doc_bytes": 4096,
        },
        "model": {"pretrained": str(base_dir), "seq_len": SEQ_LEN},
        "training": {
            "component_tokens": 200_000,
            "batch_size": 16,
            "eval_tokens": 512,
            "eval_every": 0,
            "device": "cpu",
            "precision": "fp32",
            "storage_dtype": "bfloat16",
        },
    }
    spec_path = out / "pool.yaml"
    spec_path.write_text(yaml.safe_dump(spec_doc, sort_keys=False))
    spec = load_spec(spec_path)
    t = time.perf_counter()
    build_pool(spec, prepare_only=True, show_progress=False, workers=1)
    print(f"data prepared and base copied in {time.perf_counter() - t:.0f} s")
    pool = Pool.open(pool_dir, allow_empty=True)
    general = pool.manifest["general_mixture"]
    for i, domain in enumerate(DOMAINS):
        if domain in pool.domains:
            continue
        gen = torch.Generator().manual_seed(seed * 1000 + i + 1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(original[n] + scale * torch.randn(p.shape, generator=gen))
        comp = src / domain
        model.save_pretrained(str(comp), safe_serialization=True)
        t = time.perf_counter()
        import_model(
            pool_dir,
            comp,
            component_mixture(domain, general, spec.general_share),
            spec.training.component_tokens,
            domain=domain,
            seed=seed * 1000 + i + 1,
        )
        shutil.rmtree(comp)
        print(
            f"component {domain}: base + N(0, {scale:g}^2) imported in {time.perf_counter() - t:.0f} s"
        )
    return pool_dir


# ---------------------------------------------------------------------------------------
# The parts, each run in a fresh process


def part_resident(pool_dir: Path, heldout_tokens: int) -> dict:
    import numpy as np
    import torch

    from merge_mix.pool import Pool
    from merge_mix.proxy import ProxyScorer

    torch.set_num_threads(1)
    pool = Pool.open(pool_dir)
    pool.verify("cached")  # hashing reads the files once: not part of a search's memory
    peaks = Peaks()
    peaks.reset()
    before = peaks.read()
    notices: list[str] = []
    t = time.perf_counter()
    scorer = ProxyScorer(pool, device="cpu", heldout_tokens=heldout_tokens, notice=notices.append)
    build_s = time.perf_counter() - t
    built = peaks.read()
    plan = scorer.memory
    stack_bytes = sum(s.nbytes for s in scorer.merger.stacks.values())
    merged = sum(s.shape[1] for s in scorer.merger.stacks.values())
    model_bytes = sum(p.nbytes for p in scorer.merger.model.parameters())
    k = len(pool.domains)
    peaks.reset()
    times, losses = [], []
    for w in MIXTURES:
        t = time.perf_counter()
        m = scorer.score(np.array(w))
        times.append(time.perf_counter() - t)
        losses.append(float(np.mean([m[f"heldout/{d}/loss"] for d in pool.domains])))
    scored = peaks.read()
    peaks.stop()
    return {
        "components": k,
        "merged_parameters": merged,
        "stack_dtype": scorer.merger.stack_dtype,
        "memory_plan_line": notices[0] if notices else plan.describe(),
        "plan": {
            "stack": plan.stack,
            "model": plan.model,
            "activations": plan.activations,
            "needed": plan.needed,
        },
        "stack_bytes": stack_bytes,
        "stack_bytes_formula": (k + 1) * merged * 2,
        "model_bytes": model_bytes,
        "heldout_tokens_per_mixture": int(sum(scorer.heldout.tokens(heldout_tokens).values())),
        "before": before,
        "after_build": built,
        "after_scoring": scored,
        "build_s": build_s,
        "score_s": times,
        "mean_losses": losses,
    }


def part_stream(pool_dir: Path) -> dict:
    import numpy as np
    import torch
    from memory_check import count_reads

    from merge_mix.merge import merger_for_pool
    from merge_mix.pool import Pool
    from merge_mix.proxy import memory_plan

    torch.set_num_threads(1)
    pool = Pool.open(pool_dir)
    pool.verify("cached")
    w = np.array(MIXTURES[1])
    peaks = Peaks()
    peaks.reset()
    before = peaks.read()
    streamed = merger_for_pool(pool, "cpu", stream=True)
    built = peaks.read()
    peaks.reset()
    per_merge, times = [], []
    with count_reads() as reads:
        for _ in range(2):
            reads.clear()
            t = time.perf_counter()
            streamed.merge(w)
            times.append(time.perf_counter() - t)
            per_merge.append({"opens": len(reads.opened), "tensor_bytes_read": reads.bytes})
    merging = peaks.read()
    merged = {n: p.detach().clone() for n, p in streamed.params.items()}
    del streamed
    resident = merger_for_pool(pool, "cpu", stack_dtype="bf16").merge(w)
    identical = all(torch.equal(merged[n], p) for n, p in resident.named_parameters())
    peaks.stop()
    files = sorted(pool.base_dir.glob("*.safetensors")) + [
        f for d in pool.domains for f in sorted(pool.component_dir(d).glob("*.safetensors"))
    ]
    return {
        "memory_plan_line": memory_plan(pool, "cpu", stream=True).describe(),
        "files": len(files),
        "file_bytes": sum(f.stat().st_size for f in files),
        "per_merge": per_merge,
        "merge_s": times,
        "bit_identical_to_resident_bf16": identical,
        "before": before,
        "after_build": built,
        "after_merges": merging,
    }


def part_evaluator(
    pool_dir: Path, pieces: int, batch_size: int, seq_len: int, repeats: int, vocab: int | None
):
    """Two sets of documents of mixed lengths, windows of `seq_len`: `pieces` pieces of 3
    to 2.5 x seq_len tokens cut from the search split (memory_check's), and the search
    split of the ``config`` domain as it is (short files). With `vocab`, the model is the
    base's shape with that vocabulary (e.g. Llama 3's 128,256), randomly initialised
    (seed 0): the LM head's share of the work is then a real base's."""
    import torch
    from memory_check import mixed_windows

    from merge_mix.evaluate import HeldoutSet
    from merge_mix.model import load_model
    from merge_mix.pool import Pool

    torch.set_num_threads(1)
    pool = Pool.open(pool_dir)
    model = load_model(pool.base_dir).eval()
    if vocab is not None:
        from transformers import AutoModelForCausalLM

        model.config.vocab_size = vocab
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(model.config).float().eval()
    config = HeldoutSet.from_pool_data(pool.data_dir, ["config"], pool.bos_id, seq_len, None)
    out = {
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": model.config.vocab_size,
        "torch_threads": 1,
    }
    for name, windows in (
        ("mixed_pieces", mixed_windows(pool, pieces=pieces, seed=0, seq_len=seq_len)),
        ("config_search_split", config.windows["config"]),
    ):
        print(f"evaluator, {name}:", file=sys.stderr, flush=True)
        out[name] = alternate(model, windows, batch_size, repeats)
    return out


def alternate(model, windows, batch_size: int, repeats: int) -> dict:
    """The padded and the token-batched evaluator on `windows`, alternated `repeats` times
    after one warm-up each."""
    import numpy as np
    import torch
    from eval_positions import positions
    from memory_check import padded_nll

    from merge_mix.evaluate import window_nll

    cpu = torch.device("cpu")
    n, seq_len = windows.input_ids.shape
    counted = positions(windows, batch_size)
    scored = counted["scored"]
    padded_nll(model, windows, min(n, 2), batch_size)
    window_nll(model, windows, min(n, 2), cpu, "fp32", batch_size)
    runs = []
    for _ in range(repeats):
        load = os.getloadavg()[0]
        t = time.perf_counter()
        old = padded_nll(model, windows, n, batch_size)
        t_old = time.perf_counter() - t
        t = time.perf_counter()
        new = window_nll(model, windows, n, cpu, "fp32", batch_size)
        t_new = time.perf_counter() - t
        runs.append(
            {
                "padded_s": t_old,
                "token_batched_s": t_new,
                "ratio": t_old / t_new,
                "max_rel_diff": float(np.max(np.abs(new - old) / np.abs(old))),
                "loadavg_1m": load,
            }
        )
        print(
            f"  padded {t_old:.1f} s, token-batched {t_new:.1f} s, ratio {t_old / t_new:.2f},"
            f" load {load:.2f}",
            file=sys.stderr,
            flush=True,
        )
    return {
        "seq_len": int(seq_len),
        "batch_size": batch_size,
        "windows": int(n),
        "pieces": len(windows.piece_end),
        "scored_tokens": scored,
        "positions_padded": counted["padded"],
        "positions_token_batched": counted["token_batched"],
        "runs": runs,
        "median_ratio": statistics.median(r["ratio"] for r in runs),
        "median_tokens_per_s_padded": statistics.median(scored / r["padded_s"] for r in runs),
        "median_tokens_per_s_token_batched": statistics.median(
            scored / r["token_batched_s"] for r in runs
        ),
        "max_rel_diff": max(r["max_rel_diff"] for r in runs),
    }


# ---------------------------------------------------------------------------------------


def report(part: str, r: dict) -> None:
    if part == "resident":
        k, p = r["components"], r["merged_parameters"]
        b, a, s = r["before"], r["after_build"], r["after_scoring"]
        print(f"resident: K = {k}, P = {p:,} merged parameters, {r['stack_dtype']} stack")
        print(f"  {r['memory_plan_line']}")
        print(f"  stack {r['stack_bytes']:,} bytes = (K+1) x P x 2 = {r['stack_bytes_formula']:,}")
        print(f"  RSS before {mib(b['VmRSS'])} (anon {mib(b['RssAnon'])})")
        print(
            f"  after build: RSS +{mib(a['VmRSS'] - b['VmRSS'])} (anon +{mib(a['RssAnon'] - b['RssAnon'])}),"
            f" peak +{mib(a['VmHWM'] - b['VmRSS'])} (anon peak +{mib(a['peak_anon'] - b['RssAnon'])})"
        )
        print(
            f"  scoring {len(r['score_s'])} mixtures x {r['heldout_tokens_per_mixture']:,} tokens:"
            f" peak +{mib(s['VmHWM'] - b['VmRSS'])} (anon peak"
            f" +{mib(s['peak_anon'] - b['RssAnon'])}); plan {mib(r['plan']['needed'])};"
            f" {statistics.median(r['score_s']):.1f} s per mixture"
        )
    elif part == "stream":
        m = r["per_merge"][-1]
        b, a = r["before"], r["after_merges"]
        print(f"stream: {r['memory_plan_line']}")
        print(
            f"  per merge: {m['opens']} opens of {r['files']} files, {m['tensor_bytes_read']:,}"
            f" tensor bytes read of {r['file_bytes']:,} file bytes;"
            f" {statistics.median(r['merge_s']):.1f} s per merge"
        )
        print(
            f"  peak during merges +{mib(a['VmHWM'] - b['VmRSS'])} (anon peak"
            f" +{mib(a['peak_anon'] - b['RssAnon'])}, file-backed {mib(a['RssFile'])} after);"
            f" bit-identical to the resident bf16 merge: {r['bit_identical_to_resident_bf16']}"
        )
    else:
        print(f"evaluator: {r['model_parameters']:,} parameters, 1 torch thread")
        for name in ("mixed_pieces", "config_search_split"):
            e = r[name]
            print(
                f"  {name}: {e['windows']} windows of {e['pieces']} pieces (seq_len"
                f" {e['seq_len']}, batch {e['batch_size']}), {e['scored_tokens']:,} scored"
                f" tokens; positions computed: padded {e['positions_padded']:,}, token-batched"
                f" {e['positions_token_batched']:,}"
            )
            print(
                f"    tokens/s padded {e['median_tokens_per_s_padded']:.0f}, token-batched"
                f" {e['median_tokens_per_s_token_batched']:.0f}; median ratio"
                f" {e['median_ratio']:.2f} over {len(e['runs'])} A/B pairs (load"
                f" {statistics.median(x['loadavg_1m'] for x in e['runs']):.2f}); max relative"
                f" difference {e['max_rel_diff']:.1e}"
            )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="working directory (the pool is built once in OUT/pool)")
    ap.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the demo pool's)")
    ap.add_argument("--max-bytes", type=int, default=1_000_000, help="text per domain")
    ap.add_argument("--scale", type=float, default=1e-3, help="std of the components' noise")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout-tokens", type=int, default=1024, help="per domain, resident part")
    ap.add_argument("--pieces", type=int, default=12, help="evaluator: pieces of mixed lengths")
    ap.add_argument("--seq-len", type=int, default=256, help="evaluator: window length")
    ap.add_argument("--batch-size", type=int, default=16, help="evaluator: rows (padded)")
    ap.add_argument("--repeats", type=int, default=3, help="evaluator: A/B pairs")
    ap.add_argument(
        "--vocab", type=int, help="evaluator: the base's shape with this vocabulary, random"
    )
    ap.add_argument("--part", choices=("build", *PARTS), help="run one part in this process")
    ap.add_argument("--json", help="write every figure to this JSON file")
    args = ap.parse_args()
    out = args.out.resolve()
    if args.part:
        if args.part == "build":
            build(out, args.tokenizer, args.max_bytes, args.scale, args.seed)
            return 0
        pool_dir = out / "pool"
        if args.part == "resident":
            r = part_resident(pool_dir, args.heldout_tokens)
        elif args.part == "stream":
            r = part_stream(pool_dir)
        else:
            r = part_evaluator(
                pool_dir, args.pieces, args.batch_size, args.seq_len, args.repeats, args.vocab
            )
        print("RESULT " + json.dumps(r))
        return 0

    result = print_header("memory at scale (issue 13): 4 components of 104.6M parameters, bf16")
    started = time.perf_counter()
    forwarded = [
        f"--{k.replace('_', '-')}={v}"
        for k, v in vars(args).items()
        if k not in ("out", "part", "json") and v is not None
    ]

    def run(part: str) -> dict | None:
        t = time.perf_counter()
        done = subprocess.run(
            [sys.executable, __file__, str(out), f"--part={part}", *forwarded],
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        )
        lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        for x in done.stdout.splitlines():
            if not x.startswith("RESULT "):
                print(x)
        r = json.loads(lines[-1][len("RESULT ") :]) if lines else None
        if r is not None:
            r["wall_s"] = time.perf_counter() - t
            r["loadavg_1m_after"] = os.getloadavg()[0]
            report(part, r)
        return r

    run("build")
    for part in PARTS:
        result[part] = run(part)
    result["total_s"] = time.perf_counter() - started
    print(f"total {result['total_s']:.0f} s; load average (1 min) now {os.getloadavg()[0]:.2f}")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
