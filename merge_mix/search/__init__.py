"""Search for the best data mixture, given a function that scores one.

The search never touches models: it asks a `Scorer` for the metrics of a merge-weight vector
and turns them into one objective (`merge_mix.objective`). Proposals come from a simplex grid,
Dirichlet draws around the natural mixture, Optuna's TPE or CMA-ES, or uniform random draws;
successive halving can cut the evaluation cost, and a fitted surrogate proposes a final pick.
Everything lands in an Optuna study (resumable, shareable by several workers) and in the run
directory as trials.jsonl / trials.csv / best.json / run.json.

    from merge_mix.search import SearchConfig, run_search
    result = run_search(scorer, load_objective("mean_loss"), SearchConfig(n_trials=64), run_dir)

Importing this package is cheap; optuna and scipy load when a search starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from merge_mix.search.config import SAMPLERS, SearchConfig

if TYPE_CHECKING:
    from merge_mix.search.run import SearchResult, run_search
    from merge_mix.search.study import export_trials, open_study, record_trial


@runtime_checkable
class Scorer(Protocol):
    """What the search needs from a pool + merge + evaluator."""

    domains: list[str]
    """Domain names, in the order of every weight vector."""
    natural_mixture: np.ndarray
    """Token proportions of the domains' training data: the Dirichlet prior and a baseline."""
    available_tokens: np.ndarray
    """Training tokens per domain, for the repetition caps."""

    def score(self, weights: np.ndarray, budget_tokens: int | None = None) -> dict[str, float]:
        """Metrics of the proxy merged with `weights` (shape (K,), on the simplex):
        `heldout/<domain>/{loss,ppl,bpb}` and `lmeval/<task>/<metric>`. `budget_tokens` is the
        per-domain evaluation budget; None means the scorer's default. Smaller budgets are
        cheaper and noisier."""
        ...

    def effective_mixture(self, weights: np.ndarray) -> np.ndarray:
        """The training-data mixture (shape (K,)) that the merge weights stand for."""
        ...


_LAZY = {
    "run_search": "merge_mix.search.run",
    "SearchResult": "merge_mix.search.run",
    "record_trial": "merge_mix.search.study",
    "open_study": "merge_mix.search.study",
    "export_trials": "merge_mix.search.study",
}


def __getattr__(name: str) -> Any:
    # PEP 562: the optuna-backed API loads on first use, keeping `import merge_mix.search` light.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SAMPLERS",
    "Scorer",
    "SearchConfig",
    "SearchResult",
    "export_trials",
    "open_study",
    "record_trial",
    "run_search",
]
