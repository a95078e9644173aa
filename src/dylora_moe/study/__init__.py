"""Quality study: does the mixture earn its keep against single-LoRA baselines with the same budget?

Every *unit* (one variant, one seed) trains from the same train config (default ``configs/cpu-demo.yaml``:
the default model, Code Alpaca 2k + MBPP train), with the same steps, data order and seed, changed only by
the variant's overrides; then it measures

* per-domain held-out loss (the trainer's evaluation, the same examples for every unit) and its curve,
* sandboxed greedy pass@1 on HumanEval and the MBPP test split (:func:`dylora_moe.evaluation.evaluate`,
  full sets unless ``eval_limit``),
* routing specialisation on the validation splits (:func:`dylora_moe.evaluation.analyze`: the domain x
  expert share matrix, normalised mutual information, router entropy, per-expert load; per example and
  per routing decision, which differ with token routing),
* training time.

A unit's results go to ``<output_dir>/<variant>/seed<k>/unit.json`` (written last, atomically), and a study
skips complete units, so an interrupted study resumes; a unit written before the per-decision view is
analysed again from its saved adapter (not retrained). :func:`report` aggregates every unit into
``quality.json`` (mean and spread over seeds; pass@1 also paired problem by problem with the baseline, with
an exact sign test) and plots ``loss_curves.png``, ``share_matrices.png`` and ``pass_at_1.png``. Units record
a digest of the token ids they trained and were evaluated on; the report refuses to aggregate units whose
digests differ (e.g. made with a tokenizer that chose another EOS), since their losses are not comparable.

The package: :mod:`.config` (variants, study config), :mod:`.unit` (one unit), :mod:`.runner` (the study,
units in parallel processes), :mod:`.report` (aggregation, tables, plots), :mod:`.records` (reading and
writing ``unit.json`` and ``quality.json``). Run it from the command line::

    dylora-moe study --config configs/study.yaml [--parallel 4] [--report-only] [KEY=VALUE ...]
    python benchmarks/quality.py --config configs/study.yaml          # the same

or from Python: ``run_study(StudyConfig.from_yaml("configs/study.yaml"))``. The single-LoRA baselines run
through the same code as the mixture: one expert is one LoRA (the router has nothing to choose), so data,
formatting, optimiser and evaluation are identical by construction. docs/results.md has the results.
"""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports
from .config import STUDY_FORMAT_VERSION, UNIT_FILE, StudyConfig, StudyError, VariantConfig, default_variants
from .report import plot_study, report, results_table

# the torch-using parts, imported on first use: the command line reads StudyConfig without them
_LAZY = {"run_study": ".runner", "run_unit": ".unit"}

if TYPE_CHECKING:
    from .runner import run_study
    from .unit import run_unit

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

__all__ = ["STUDY_FORMAT_VERSION", "UNIT_FILE", "StudyConfig", "StudyError", "VariantConfig", "default_variants",
           "plot_study", "report", "results_table", "run_study", "run_unit"]
