"""lm-evaluation-harness integration, in three parts:

- `merge_mix.lmeval.tasks`: tasks written from a pool's held-out data (`make_tasks`,
  ``merge-mix make-tasks POOL --out eval_tasks``): per domain a rolling perplexity task and a
  multiple-choice continuation task, and a group per pool;
- `merge_mix.lmeval.score`: scoring an in-memory (merged) model on lm-eval tasks
  (`evaluate_tasks`), with the task loading, offline datasets and BOS handling it needs;
- `merge_mix.lmeval.model`: the ``merge-mix`` model type for lm-eval's command line
  (``merge-mix lm-eval --model merge-mix --model_args pool=PATH,weights=...``).

Every public name is importable from here. Importing this package does not import lm_eval,
transformers or torch; the functions that need them do.
"""

from merge_mix.lmeval.model import (
    MODEL_TYPE,
    register_model_type,
    resolve_device,
    rewrite_model_args,
    run_lm_eval_cli,
    run_name,
)
from merge_mix.lmeval.score import (
    allow_network,
    evaluate_tasks,
    flatten_results,
    hflm_bos_args,
    metric_directions,
    quiet_lm_eval,
    task_sizes,
)
from merge_mix.lmeval.tasks import (
    CONTEXT_TOKENS,
    FORMAT,
    FORMAT_VERSION,
    TASKS_MANIFEST,
    group_name,
    make_tasks,
    sanitise,
    task_names,
)

__all__ = [
    "CONTEXT_TOKENS",
    "FORMAT",
    "FORMAT_VERSION",
    "MODEL_TYPE",
    "TASKS_MANIFEST",
    "allow_network",
    "evaluate_tasks",
    "flatten_results",
    "group_name",
    "hflm_bos_args",
    "make_tasks",
    "metric_directions",
    "quiet_lm_eval",
    "register_model_type",
    "resolve_device",
    "rewrite_model_args",
    "run_lm_eval_cli",
    "run_name",
    "sanitise",
    "task_names",
    "task_sizes",
]
