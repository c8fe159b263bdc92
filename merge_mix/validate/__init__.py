"""Validation: how faithfully merged proxies rank mixtures, measured against real models.

``merge-mix validate POOL`` (or `validate`) trains *reference* models from the pool's base,
each on the effective data mixture a set of merge weights stands for, with the components'
hyperparameters and token budget; scores each reference and the merged proxy of the same
weights with the same evaluator on the same held-out windows; and reports rank fidelity
(`merge_mix.validate.metrics`) per domain, on the mean loss over domains and on the worst
domain, raw and calibrated (leave-one-out), with each component's drift from the base. Optionally
also on lm-eval benchmark metrics (the same tasks for proxies and references) and on a search
objective's value.

Every figure is measured on the pool's ``test`` held-out split; the calibration is fitted on
the ``search`` split. Regrets, gains and proxy-minus-real gaps carry paired bootstrap
intervals over test documents, next to a seed-noise floor from extra seeds of some references.

Stages, one module each: `mixtures` (which mixtures), `references` (train or reuse the
reference models, and their extra seeds, stored in the pool), `run` (`validate` itself:
scoring, measuring, calibrating), `report` and `summary` (validation.json, references.csv,
report.md/html, `format_summary`). The numbers: `metrics` (rank fidelity: correlations with
bootstrap intervals, regret, capability recovery), `intervals` (paired intervals over test
documents, the seed-noise floor), `calibration` (the fitted proxy-minus-real gap),
`proxy_calibration` (a pool's calibration.json, `load_calibration`) and `drift` (component
drift from the base, `drift_warning`).

Everything is resumable: references are committed one by one (record written last), an
interrupted one resumes from its checkpoint, and finished ones are reused (sha256-verified)
by any later validation of the pool. Several processes may validate one pool at once; each
trains the references no other process holds and waits for the rest.
"""

from merge_mix.validate.drift import drift_warning
from merge_mix.validate.metrics import FIDELITY_HOLDS
from merge_mix.validate.mixtures import MIN_MIXTURES, load_mixtures
from merge_mix.validate.proxy_calibration import ProxyCalibration, load_calibration
from merge_mix.validate.run import validate
from merge_mix.validate.summary import format_summary

__all__ = [
    "FIDELITY_HOLDS",
    "MIN_MIXTURES",
    "ProxyCalibration",
    "drift_warning",
    "format_summary",
    "load_calibration",
    "load_mixtures",
    "validate",
]
