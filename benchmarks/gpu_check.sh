#!/usr/bin/env bash
# The GPU check (issue 13, item 5): build a small pool, search it, print mixtures per minute,
# peak GPU memory and the merge bandwidth against a device copy (see benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--max-bytes N] [--json PATH]  # with a CUDA GPU
#   bash benchmarks/gpu_check.sh --small [--out DIR]                        # CPU, seconds (CI)
#
# Runs with $PYTHON if set, else the checkout's .venv/bin/python, else python3. Offline.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$here/../.venv/bin/python" ]]; then
        python="$here/../.venv/bin/python"
    else
        python="python3"
    fi
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$python" "$here/gpu_check.py" "$@"
