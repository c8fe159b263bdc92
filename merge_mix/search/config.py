"""`SearchConfig`: every knob of a mixture search, with its checks in one place.

Light to import (no optuna), so the CLI can build and validate a config before any heavy
import. Build it directly, or from a parsed YAML mapping with `SearchConfig.from_dict`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from merge_mix.errors import MergeMixError

if TYPE_CHECKING:
    from merge_mix.search.simplex import Caps

SAMPLERS = ("grid", "dirichlet", "tpe", "cmaes", "random")
OPTUNA_SAMPLERS = ("tpe", "cmaes")
HALVING_SAMPLERS = ("dirichlet", "random")
JOURNAL_SUFFIXES = (".jsonl", ".log")


@dataclass(frozen=True)
class SearchConfig:
    """How to search for the best mixture. Defaults follow RegMix/DeMix where they apply."""

    sampler: str = "dirichlet"
    """Proposal method: "grid" (K <= 3), "dirichlet" (around the natural-mixture prior, with
    token caps), "tpe" or "cmaes" (Optuna over the simplex), "random" (Dirichlet(1))."""
    n_trials: int = 64
    """Sampled trials this worker completes in total, across restarts (baselines, retries of
    other workers' trials and the surrogate pick are extra). With halving: the number of
    candidates M scored at the smallest budget. Ignored by "grid", whose size is the budget."""
    worker: str = "main"
    """This worker's id. Workers sharing a study need distinct ids; restarting with the same
    id resumes that worker's quota and re-scores the trials it left running."""
    seed: int = 0
    """Seed for every random choice; each worker derives its own stream from it."""
    storage: str | None = None
    """Where the Optuna study lives: None for `study.db` (SQLite) in the run directory, a path
    ending in .jsonl or .log (journal file, safe for several processes on one file system), or
    a database URL such as sqlite:///path.db or postgresql://user@host/db; ":memory:" keeps
    it in this process only (no resume, no sharing: for tests and dry runs)."""
    study_name: str = "merge-mix"
    """Name of the study inside the storage."""
    budget_tokens: int | None = None
    """Per-domain evaluation token budget of a full-budget score (baselines included); None
    means every piece of the scorer's split. Keep it fixed within a study. Halving scores the
    early rungs at budget_tokens / eta^j (`search_pool` sets None to the largest domain's
    token count)."""
    grid_step: float = 0.1
    """Spacing of the "grid" sampler; 1 / grid_step must be a whole number."""
    temperature: float = 0.7
    """"dirichlet": the prior is natural_mixture ** temperature (DeMix uses 0.7; 1 keeps the
    natural proportions, 0 flattens them to uniform)."""
    strength: tuple[float, float] = (0.5, 5.0)
    """"dirichlet": range of the concentration s, drawn log-uniformly; alpha = s * prior.
    Small s gives sparse, adventurous mixtures, large s stays near the prior."""
    train_tokens: int | None = None
    """Planned training token budget of the final model; with it, each domain's share of the
    effective data mixture is capped at available_tokens * max_epochs / train_tokens (see
    `caps`). None: no repetition caps."""
    max_epochs: float = 4.0
    """Most times a domain's data may be repeated in the planned training run (up to ~4
    epochs of repetition is close to fresh data for LM training)."""
    caps: Mapping[str, float] | None = None
    """Explicit caps {domain: c} on the effective data mixture r = s * g + (1 - s) * w that
    merge weights w stand for (s, g: the pool's general share and mixture); the tighter of
    these and the repetition caps holds for every proposal (samplers, halving, surrogate,
    gradient), as the merge-weight cap w_i <= (c_i - s * g_i) / (1 - s). A cap below the
    floor s * g_i is an error."""
    min_weight: float = 2e-4
    """"dirichlet": weights below this are set to 0 and the rest renormalised (DeMix: 2e-4)."""
    dedup_tol: float = 1e-3
    """"dirichlet"/"random": a proposal within this max-abs distance of an existing trial is
    redrawn."""
    halving: bool = False
    """Successive halving: score n_trials candidates at a small budget, promote the best
    1/eta to eta-times larger budgets, up to budget_tokens."""
    eta: int = 3
    """Halving: the promotion ratio and the budget growth factor between rungs."""
    rungs: int = 3
    """Halving: number of budget levels; the smallest is budget_tokens / eta^(rungs - 1)."""
    halving_verify: bool = False
    """Halving: also score every candidate at full budget to check the pick (costs the full
    price; for validating the method, not for production runs)."""
    surrogate: bool = True
    """After sampling, fit a mixing law and a kernel regressor per objective metric, pick the
    average of the top_k predicted mixtures, and score that pick for real."""
    surrogate_candidates: int = 100_000
    """Surrogate: number of simulated candidate mixtures (Dirichlet around the prior)."""
    top_k: int = 128
    """Surrogate: how many of the best predicted candidates are averaged into the pick."""
    folds: int = 5
    """Surrogate: folds of the cross-validation that reports each model's held-out Spearman."""
    progress: bool = True
    """Show a progress bar with the best objective so far on stderr."""

    def __post_init__(self) -> None:
        def fail(name: str, problem: str) -> None:
            raise MergeMixError(f"search config: {name}: {problem}")

        if self.sampler not in SAMPLERS:
            fail("sampler", f"{self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        if not isinstance(self.n_trials, int) or self.n_trials < 0:
            fail("n_trials", f"{self.n_trials!r} is not a whole number >= 0")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(self.worker)):
            fail("worker", f"{self.worker!r} should be letters, digits, '_', '.' or '-'")
        if self.storage not in (None, ":memory:") and not (
            "://" in self.storage or self.storage.endswith(JOURNAL_SUFFIXES)
        ):
            fail(
                "storage",
                f"{self.storage!r} is neither a journal file (.jsonl/.log) nor a database URL "
                "(sqlite:///..., postgresql://...)",
            )
        if self.budget_tokens is not None and self.budget_tokens < 1:
            fail("budget_tokens", f"{self.budget_tokens} is not a positive token count")
        n_steps = round(1.0 / self.grid_step) if self.grid_step > 0 else 0
        if not 0 < self.grid_step <= 1 or abs(n_steps * self.grid_step - 1.0) > 1e-9:
            fail("grid_step", f"{self.grid_step} must divide 1 into a whole number of steps")
        if not self.temperature >= 0:
            fail("temperature", f"{self.temperature} is negative")
        if len(self.strength) != 2 or not 0 < self.strength[0] <= self.strength[1]:
            fail("strength", f"{self.strength} should be (low, high) with 0 < low <= high")
        if self.train_tokens is not None and self.train_tokens < 1:
            fail("train_tokens", f"{self.train_tokens} is not a positive token count")
        if not self.max_epochs > 0:
            fail("max_epochs", f"{self.max_epochs} is not positive")
        if self.caps is not None:
            if not isinstance(self.caps, Mapping) or not self.caps:
                fail("caps", f"{self.caps!r} is not a non-empty mapping of domain -> cap")
            for name, cap in self.caps.items():
                if not isinstance(cap, (int, float)) or not 0 < cap <= 1:
                    fail("caps", f"{name}={cap!r} is not a share in (0, 1]")
            # A plain dict of floats: run.json and `to_dict` round-trip it.
            object.__setattr__(self, "caps", {str(k): float(v) for k, v in self.caps.items()})
        if not 0 <= self.min_weight < 0.5:
            fail("min_weight", f"{self.min_weight} is not in [0, 0.5)")
        if not self.dedup_tol >= 0:
            fail("dedup_tol", f"{self.dedup_tol} is negative")
        if self.eta < 2:
            fail("eta", f"{self.eta} must be at least 2")
        if self.rungs < 2:
            fail("rungs", f"{self.rungs} must be at least 2")
        if self.halving:
            if self.sampler not in HALVING_SAMPLERS:
                fail(
                    "halving",
                    f"needs a sampler that proposes all candidates up front "
                    f"({', '.join(HALVING_SAMPLERS)}), not {self.sampler!r}",
                )
            # budget_tokens None is "every piece of the search split"; `search_pool` turns it
            # into the largest domain's token count before halving divides it.
            if (
                self.budget_tokens is not None
                and self.budget_tokens // self.eta ** (self.rungs - 1) < 1
            ):
                fail("rungs", f"{self.rungs} rungs of eta={self.eta} leave no tokens to score")
            if self.n_trials < self.eta:
                fail("n_trials", f"halving needs at least eta={self.eta} candidates")
        if self.halving_verify and not self.halving:
            fail("halving_verify", "only applies with halving")
        if self.top_k < 1 or self.surrogate_candidates < self.top_k:
            fail("top_k", f"{self.top_k} must be >= 1 and <= surrogate_candidates")
        if self.folds < 2:
            fail("folds", f"{self.folds} must be at least 2")

    def check_pool(self, domains: Sequence[str], available_tokens: np.ndarray) -> None:
        """Checks that need the pool: grid size, token caps, domain names (the caps against
        the merge floor are checked by `caps_for`)."""
        from merge_mix.search.simplex import simplex_grid, token_caps

        if len(domains) < 2:
            raise MergeMixError(f"pool: a mixture needs at least 2 domains, got {list(domains)}")
        if len(set(domains)) != len(domains) or any("/" in d or not d for d in domains):
            raise MergeMixError(f"pool: domain names must be unique, without '/': {domains}")
        if len(available_tokens) != len(domains):
            raise MergeMixError(
                f"pool: {len(available_tokens)} available_tokens for {len(domains)} domains"
            )
        if self.sampler == "grid":
            simplex_grid(len(domains), self.grid_step)
        token_caps(available_tokens, self.train_tokens, self.max_epochs)
        unknown = [d for d in self.caps or {} if d not in domains]
        if unknown:
            raise MergeMixError(
                f"search config: caps: {unknown[0]!r} is not a domain of this pool "
                f"({', '.join(domains)})"
            )

    def caps_for(self, scorer: Any) -> Caps:
        """This config's caps for `scorer`'s pool, in effective-mixture and merge-weight
        space (`merge_mix.search.simplex.data_caps`)."""
        from merge_mix.search.simplex import data_caps

        return data_caps(
            list(scorer.domains),
            np.asarray(scorer.available_tokens, dtype=float),
            self.train_tokens,
            self.max_epochs,
            self.caps,
            scorer.effective_mixture,
        )

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SearchConfig:
        """Build from a parsed YAML mapping; unknown keys are errors that name the key."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [key for key in raw if key not in names]
        if unknown:
            raise MergeMixError(f"search config: unknown key {unknown[0]!r}")
        values = dict(raw)
        if "strength" in values:
            values["strength"] = tuple(values["strength"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for run.json."""
        values = dataclasses.asdict(self)
        values["strength"] = list(self.strength)
        values["caps"] = None if self.caps is None else dict(self.caps)
        return values
