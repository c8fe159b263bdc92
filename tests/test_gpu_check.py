"""CI's run of the GPU check: `benchmarks/gpu_check.sh --small` builds the tiny pool in bf16
on the CPU, searches it and measures a merge; its result lines are checked here (figures
with known answers exactly, timings only for being there)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"


@pytest.mark.slow
def test_gpu_check_small_runs_the_whole_path_on_the_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run(
        ["bash", str(SCRIPT), "--small", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = {
        line.split(":", 2)[1].split()[0]: line
        for line in done.stdout.splitlines()
        if line.startswith("gpu_check: ")
    }
    assert lines["mode"].startswith("gpu_check: mode small: CPU smoke run")
    assert lines["pool"].startswith(
        "gpu_check: pool 3 components of 80,112 parameters (storage bfloat16)"
    )
    # The search announced its plan: the bf16 stack, resident on the CPU.
    assert "memory: resident bf16 stack on cpu: stack 0.6 MiB" in done.stderr
    n = len((tmp_path / "run" / "trials.jsonl").read_text().splitlines())
    search = r"gpu_check: search (\d+) mixtures in [\d.]+ s: ([\d.]+) mixtures per minute"
    found = re.match(search, lines["search"])
    assert found and int(found[1]) == n and float(found[2]) > 0
    assert lines["peak"].startswith("gpu_check: peak GPU memory n/a (CPU run); process peak RSS")
    # (K + 1) x P x 2 bytes: 4 x 80,112 x 2.
    assert lines["stack"] == (
        "gpu_check: stack 640,896 bytes = (K + 1) x P x 2 = (3 + 1) x 80,112 x 2 (bf16)"
    )
    merge = r"gpu_check: merge [\d.]+ ms: ([\d.]+) GB/s .* ratio ([\d.]+)$"
    found = re.match(merge, lines["merge"])
    assert found and float(found[1]) > 0 and float(found[2]) > 0
    assert re.match(r"gpu_check: total [\d.]+ s$", lines["total"])
