"""Gradient search settings on the demo pool: each setting's pick scored on the scoring slice.

Prints the uniform mixture's objective (mean held-out loss, 16,384 tokens per domain), then
for each (method, lr, training-slice tokens, steps): the scored objective of the gradient
search's result, its weights, the wall time and the training-slice objective per step.

    .venv/bin/python benchmarks/bench_gradient.py [POOL]
"""

from __future__ import annotations

import sys
import time

import numpy as np

from merge_mix.objective import preset
from merge_mix.proxy import ProxyScorer
from merge_mix.search.gradient import GradientConfig, gradient_search

SETTINGS = [("mirror", 2.0, 16_384, 12), ("mirror", 5.0, 16_384, 12), ("softmax", 0.2, 16_384, 12)]


def main() -> None:
    scorer = ProxyScorer(sys.argv[1] if len(sys.argv) > 1 else "pools/demo", heldout_tokens=16_384)
    objective = preset("mean_loss")

    def value(weights: np.ndarray) -> float:
        return objective.evaluate(scorer.score(weights)).value

    k = len(scorer.domains)
    print("uniform", value(np.full(k, 1.0 / k)), flush=True)
    for method, lr, tokens, steps in SETTINGS:
        started = time.time()
        config = GradientConfig(steps=steps, lr=lr, method=method, train_tokens=tokens)
        result = gradient_search(scorer, objective, config)
        elapsed = time.time() - started
        history = [round(h["objective_train"], 4) for h in result.history]
        print(method, lr, tokens, steps, "score", round(value(result.weights), 5),
              np.round(result.weights, 3), "time", round(elapsed, 1), history, flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
