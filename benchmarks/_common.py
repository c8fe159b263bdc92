"""What every benchmark here prints and records: the machine, the exact command line, and
median timings; plus the synthetic Llama base and components the merge benchmarks share.

Not runnable on its own; the ``bench_*.py`` scripts import it (it sits beside them).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Llama sizes for the merge benchmarks. "full" has 33,694,208 parameters (>= 25M, issue 3).
SIZES = {
    "full": dict(hidden=512, layers=8, heads=8, intermediate=1376, vocab=8192),
    "small": dict(hidden=64, layers=2, heads=2, intermediate=172, vocab=512),
}


def command_line() -> str:
    """The command as typed from the current directory (interpreter path kept relative)."""
    exe = sys.executable
    try:
        rel = os.path.relpath(exe)
        if not rel.startswith(".."):
            exe = rel
    except ValueError:
        pass
    return shlex.join([exe, *sys.argv])


def machine_info() -> dict:
    """nproc, CPU model, RAM, OS, Python and torch versions and threads."""
    import torch

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gb = round(int(line.split()[1]) / 1024**2, 1)
                break
    except OSError:
        pass
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "nproc": nproc,
        "cpu_model": cpu,
        "ram_gb": ram_gb,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def code_version() -> str:
    """The checkout's commit, with "+dirty" if the working tree has changes."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def print_header(title: str) -> dict:
    """Print the command, the code version and the machine; return them for the JSON."""
    info = machine_info()
    cmd = command_line()
    code = code_version()
    print(f"== {title}")
    print(f"command: {cmd}")
    print(f"code: merge-mix {code}")
    print(
        f"machine: nproc {info['nproc']}, {info['cpu_model']}, {info['ram_gb']} GB RAM,"
        f" {info['os']}"
    )
    print(
        f"python {info['python']}, torch {info['torch']}, torch.get_num_threads()"
        f" = {info['torch_threads']}, load average (1 min) at start {info['loadavg_1m_at_start']}"
    )
    return {"command": cmd, "code": code, "machine": info}


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median_time(fn: Callable[[], object], repeat: int, warmup: int = 1) -> tuple[float, list]:
    """Median wall time of `repeat` calls after `warmup` untimed ones, and all the times."""
    for _ in range(warmup):
        fn()
    times = [timed(fn) for _ in range(repeat)]
    return statistics.median(times), times


def write_json(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")


def llama_config(size: str):
    from transformers import LlamaConfig

    s = SIZES[size]
    return LlamaConfig(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"],
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


def make_components(root: Path, size: str, k: int, seed: int, scale: float = 0.01) -> dict:
    """Save a seeded random Llama base and `k` components (base + seeded Gaussian
    perturbations of std `scale`) with save_pretrained (safetensors) under `root`.

    Returns ``{"base": Path, "components": {name: Path}, "parameters": int}``."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    config = llama_config(size)
    torch.manual_seed(seed)
    base = LlamaForCausalLM(config).eval()
    n_params = sum(p.numel() for p in base.parameters())
    base.save_pretrained(str(root / "base"), safe_serialization=True)
    components = {}
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    for i in range(k):
        gen = torch.Generator().manual_seed(seed * 1000 + i + 1)
        with torch.no_grad():
            for n, p in base.named_parameters():
                p.copy_(original[n] + scale * torch.randn(p.shape, generator=gen))
        name = f"c{i}"
        base.save_pretrained(str(root / name), safe_serialization=True)
        components[name] = root / name
    return {"base": root / "base", "components": components, "parameters": n_params}


MERGE_WEIGHTS = (0.4, 0.3, 0.2, 0.1)
"""The merge benchmarks' weights over their K = 4 synthetic components."""


@contextlib.contextmanager
def synthetic_pool(args, prefix: str) -> Iterator[dict]:
    """The merge benchmarks' setup: torch threads from ``--threads``, then a temporary
    directory holding `make_components` of size ``--small``/full with K = len(MERGE_WEIGHTS)
    components seeded by ``--seed``. Yields make_components' dict plus ``weights`` (numpy),
    ``k``, ``size`` and ``build_s``; the directory is removed afterwards."""
    import tempfile

    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    k, size = len(MERGE_WEIGHTS), "small" if args.small else "full"
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        t0 = time.perf_counter()
        made = make_components(Path(tmp), size, k, args.seed)
        n_params = made["parameters"]
        print(f"model: Llama ({size}) with {n_params:,} parameters per model, K = {k} components")
        yield {
            **made,
            "weights": np.array(MERGE_WEIGHTS),
            "k": k,
            "size": size,
            "build_s": time.perf_counter() - t0,
        }


def tiny_pool_spec(root: Path, output: str = "pool", storage_dtype: str = "float32") -> Path:
    """Write ``root/<output>.yaml``: the test suite's tiny 3-domain pool
    (``tests/conftest.py`` `tiny_spec_dict`: stdlib modules, the interpreter's C headers,
    pydoc topics; a 2-layer model of about 80k parameters, built in seconds on a CPU), for
    the ``--small`` modes that build a real pool."""
    import importlib

    import yaml

    tests = str(Path(__file__).resolve().parent.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    spec = importlib.import_module("conftest").tiny_spec_dict(root, output)
    spec["training"]["storage_dtype"] = storage_dtype
    path = root / f"{output}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
