"""Data stage benchmark: peak memory against domain size, tokenizing throughput against
the `tokenizers` library's own `encode_batch`, 1 and 2 workers.

For each size, a one-domain jsonl corpus is built in a scratch directory from text on
this machine (the standard library's and site-packages' ``.py``/``.md``/``.txt``/``.h``
files under 256 KB; past the first copy, every fifth word of a repeat carries the copy
number, so no two documents are equal and no 8-word run repeats across copies) and the pool's data is prepared in a child process
(`merge_mix.pool_build._prepare_data`), which reports its own peak RSS and its workers' largest.
The BPE (4096 tokens, trained on 2 MB of the smallest corpus) is shared by every run.
The `encode_batch` baseline tokenizes the same training pieces, in 1 MB batches, in a
child process with ``RAYON_NUM_THREADS`` = workers; only the encode calls are timed.

    nice -n 19 .venv/bin/python benchmarks/data_stage.py --sizes-gb 0.2 2 --workers 1 2 \\
        --big-workers 2 --json benchmarks/results/data_stage.json

With ``--repeats N`` (sizes under 1 GB) each (stage, `encode_batch`) pair runs N times,
alternating, and medians are reported: on a shared machine both sides then see the same
load. The scratch directory (default: a new one under /tmp) is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

SPEC_DATA = {
    "heldout_fraction": 0.25,
    "heldout_max_documents": 100,
    "heldout_max_pieces": 2,
    "max_doc_bytes": 4096,
}


def _base_texts(limit_bytes: int = 400_000_000) -> list[str]:
    roots = [Path(sysconfig.get_paths()[k]) for k in ("stdlib", "purelib", "include")]
    texts, total = [], 0
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.suffix not in (".py", ".md", ".txt", ".h", ".rst") or not p.is_file():
                continue
            try:
                if p.stat().st_size > 256_000:
                    continue
                text = p.read_text("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if text.strip():
                texts.append(text)
                total += len(text.encode())
            if total >= limit_bytes:
                return texts
    return texts


def _variant(text: str, copy: int) -> str:
    """Copy `copy` of a text with every fifth word suffixed by the copy number: every run
    of 8 words differs from other copies', so decontamination does not drop all held-out
    text as near-duplicates of training copies, and the n-gram set grows with the corpus."""
    words = text.split(" ")
    words[::5] = [f"{w}{copy}" for w in words[::5]]
    return f"# copy {copy}\n" + " ".join(words)


def make_corpus(path: Path, target_bytes: int, texts: list[str]) -> int:
    """A jsonl of distinct documents totalling about `target_bytes` of text."""
    written = 0
    with path.open("w", encoding="utf-8") as fh:
        copy = 0
        while written < target_bytes:
            for text in texts:
                doc = f"# copy {copy}\n{text}" if copy == 0 else _variant(text, copy)
                fh.write(json.dumps({"text": doc}) + "\n")
                written += len(doc.encode())
                if written >= target_bytes:
                    break
            copy += 1
    return written


def _spec(root: Path, corpus: Path, tokenizer: Path | None, name: str) -> Path:
    import yaml

    spec = {
        "name": name,
        "output_dir": str(root / name),
        "domains": {"big": {"sources": [{"jsonl": str(corpus)}]}},
        "data": SPEC_DATA,
        "tokenizer": {"vocab_size": 4096, "sample_bytes": 2_000_000},
    }
    if tokenizer is not None:
        spec["tokenizer"] = {"path": str(tokenizer)}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (``VmRSS``) or its peak (``VmHWM``), MB. Not
    ``ru_maxrss``: across exec Linux keeps the pre-exec peak, the benchmark parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def child_prepare(spec_path: str, workers: int) -> dict:
    """Run in a child process: prepare the data, report time, passes and peak RSS."""
    import merge_mix.data.prepare as prepare
    from merge_mix.config import load_spec
    from merge_mix.pool_build import _prepare_data

    spent: dict[str, float] = {}

    def timed(name, fn):
        def run(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t

        return run

    prepare.scan_domain = timed("scan", prepare.scan_domain)
    prepare._tokenize_domain = timed("tokenize", prepare._tokenize_domain)
    from transformers import PreTrainedTokenizerFast  # noqa: F401  (torch comes with it)

    baseline = _rss_mb()
    spec = load_spec(spec_path)
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    data = _prepare_data(spec, spec.output_dir, workers=workers)
    total = time.perf_counter() - t
    entry = data["domains"]["big"]
    return {
        "seconds": round(total, 1),
        "scan_seconds": round(spent.get("scan", 0), 1),
        "tokenize_seconds": round(spent.get("tokenize", 0), 1),
        "train_bytes": entry["train"]["bytes"],
        "train_tokens": entry["train"]["tokens"],
        "rss_after_imports_mb": baseline,
        "peak_rss_mb": _rss_mb("VmHWM"),
        "worker_peak_rss_mb": round(
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1
        ),
    }


def child_encode(tokenizer_json: str, corpus: str, max_doc_bytes: int) -> dict:
    """Run in a child process with RAYON_NUM_THREADS set: `encode_batch` throughput on the
    corpus's pieces (the stage's cutting rule), 1 MB batches."""
    from tokenizers import Tokenizer

    from merge_mix.data.split import cut_pieces

    tok = Tokenizer.from_file(tokenizer_json)
    spent, size, tokens = 0.0, 0, 0
    batch, batch_bytes = [], 0

    def flush():
        nonlocal spent, tokens
        t = time.perf_counter()
        encs = tok.encode_batch(batch, add_special_tokens=False)
        spent += time.perf_counter() - t
        tokens += sum(len(e.ids) for e in encs)

    with open(corpus, encoding="utf-8") as fh:
        for line in fh:
            for piece in cut_pieces(json.loads(line)["text"], max_doc_bytes):
                n = len(piece.encode())
                batch.append(piece)
                batch_bytes += n
                size += n
                if batch_bytes >= 1 << 20:
                    flush()
                    batch, batch_bytes = [], 0
    if batch:
        flush()
    return {"seconds": round(spent, 1), "bytes": size, "tokens": tokens}


def _child(args: list[str], env: dict | None = None) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if out.returncode:
        sys.exit(f"{' '.join(args)} failed:\n" + "\n".join(out.stderr.splitlines()[-5:]))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_prepare":
        print(json.dumps(child_prepare(sys.argv[2], int(sys.argv[3]))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_encode":
        print(json.dumps(child_encode(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-gb", type=float, nargs="+", default=[0.2, 2.0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--big-workers", type=int, nargs="+", default=[2], help="for sizes >= 1 GB")
    ap.add_argument(
        "--repeats", type=int, default=1, help="pairs (stage, encode_batch) per size < 1 GB"
    )
    ap.add_argument("--scratch", type=Path, default=None)
    ap.add_argument("--json", dest="out", type=Path, default=None, help="write the figures here")
    args = ap.parse_args()
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="mm-data-stage-"))
    scratch.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "python": platform.python_version(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "spec_data": SPEC_DATA,
        "runs": [],
    }
    try:
        texts = _base_texts()
        sizes = sorted(args.sizes_gb)
        tokenizer = None
        for gb in sizes:
            corpus = scratch / f"corpus_{gb:g}gb.jsonl"
            size = make_corpus(corpus, int(gb * 1e9), texts)
            print(f"corpus {gb:g} GB: {size / 1e9:.2f} GB of text", flush=True)
            for workers in args.workers if gb < 1 else args.big_workers:
                name = f"pool_{gb:g}gb_w{workers}"
                repeats = []
                for _ in range(args.repeats if gb < 1 else 1):
                    spec = _spec(scratch, corpus, tokenizer, name)
                    run = _child(["_prepare", str(spec), str(workers)])
                    run.update(size_gb=round(size / 1e9, 3), workers=workers)
                    run["tokenize_mb_s"] = round(
                        run["train_bytes"] / 1e6 / run["tokenize_seconds"], 2
                    )
                    if tokenizer is None:
                        shutil.copytree(scratch / name / "tokenizer", scratch / "tokenizer")
                        tokenizer = scratch / "tokenizer"
                    shutil.rmtree(scratch / name, ignore_errors=True)
                    if gb < 1:  # right after, so both see the same load on a shared machine
                        base = _child(
                            ["_encode", str(tokenizer / "tokenizer.json"), str(corpus), "4096"],
                            {"RAYON_NUM_THREADS": str(workers), "TOKENIZERS_PARALLELISM": "true"},
                        )
                        run["encode_batch_mb_s"] = round(base["bytes"] / 1e6 / base["seconds"], 2)
                        run["ratio_to_encode_batch"] = round(
                            run["tokenize_mb_s"] / run["encode_batch_mb_s"], 2
                        )
                    print(json.dumps(run), flush=True)
                    repeats.append(run)
                if len(repeats) > 1:
                    summary = {"size_gb": repeats[0]["size_gb"], "workers": workers}
                    for key in ("tokenize_mb_s", "encode_batch_mb_s", "ratio_to_encode_batch"):
                        summary[f"median_{key}"] = statistics.median(r[key] for r in repeats)
                    summary["max_peak_rss_mb"] = max(r["peak_rss_mb"] for r in repeats)
                    print(json.dumps(summary), flush=True)
                    results.setdefault("medians", []).append(summary)
                results["runs"].extend(repeats)
            corpus.unlink()
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
