"""The quality study (issue #8) as a benchmark script: the same as ``dylora-moe study``.

Trains DyLoRA-MoE 4 x r=16 (sequence and token routing), one LoRA r=16 and one LoRA r=64 on the same data,
steps, order and seed, plus sweeps of the balance coefficient, the router temperature and the data mixing;
measures per-domain held-out loss, sandboxed greedy pass@1 on HumanEval and MBPP, routing specialisation
and training time; writes quality.json, plots and results_table.md (see src/dylora_moe/study/ and
docs/results.md)::

    python benchmarks/quality.py --config configs/study.yaml                       # the full study
    python benchmarks/quality.py --config configs/study.yaml eval_limit=10 seeds=[0]  # a quick look
"""

from __future__ import annotations

import sys

from dylora_moe.cli import main

if __name__ == "__main__":
    sys.exit(main(["study", *sys.argv[1:]]))
