"""Run a study: every unit not yet complete, in this process or ``parallel`` child processes, then the report.

Children run ``python -m dylora_moe.study unit STUDY_CONFIG_JSON VARIANT SEED``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import STUDY_FORMAT_VERSION, UNIT_FILE, StudyConfig, VariantConfig
from .records import write_json
from .report import report
from .unit import _unit_stale, run_unit


def _unit_complete(study: StudyConfig, variant: VariantConfig, seed: int) -> bool:
    path = study.unit_dir(variant.name, seed) / UNIT_FILE
    return path.is_file() and not _unit_stale(study, variant, json.loads(path.read_text()))


def run_study(study: StudyConfig, progress: bool = True, report_only: bool = False) -> dict[str, Any]:
    """Run every unit not yet complete (``parallel`` at a time, each in its own process when > 1), then
    :func:`report`. A failing unit is reported by name at the end; the others still run."""
    out = Path(study.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "study_config.json"
    write_json(config_path, {"format_version": STUDY_FORMAT_VERSION, "config": study.to_dict()})
    pending = [(v, s) for v, s in study.units() if not _unit_complete(study, v, s)]
    failures: list[str] = []
    if not report_only and pending:
        if study.parallel == 1:
            for variant, seed in pending:
                print(f"--- unit {variant.name} seed {seed} ---", flush=True)
                run_unit(study, variant, seed, progress)
        else:
            failures = _run_parallel(study, config_path, pending)
    quality = report(study)
    if failures:
        raise RuntimeError(f"{len(failures)} unit(s) failed (logs next to them): {', '.join(failures)}")
    return quality


def _visible_gpus() -> list[str]:
    """The GPUs units can be spread over: CUDA_VISIBLE_DEVICES's entries, else every device torch sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    import torch  # here, not at the top: a study that only reports never needs it

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _usable_cpus() -> int:
    """The CPU cores this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _child_threads(parallel: int) -> dict[str, str]:
    """The CPU thread count each of ``parallel`` children gets, as environment variables: the usable cores
    shared out (at least one each), so that ``parallel`` PyTorch processes do not each start one thread per
    core (oversubscribed, they run many times slower). A variable already set in the environment wins."""
    threads = str(max(1, _usable_cpus() // parallel))
    return {name: os.environ.get(name, threads) for name in THREAD_VARIABLES}


def _run_parallel(study: StudyConfig, config_path: Path, pending: list[tuple[VariantConfig, int]]) -> list[str]:
    """Each unit in a child process (``python -m dylora_moe.study unit ...``), ``parallel`` at a time. With
    several GPUs, each running unit gets its own (``CUDA_VISIBLE_DEVICES``, round robin over free slots).
    Each child gets its share of the CPU cores as ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``
    (:func:`_child_threads`) unless those are set already."""
    queue, running, failures = list(pending), [], []
    gpus = _visible_gpus() if study.device in ("auto", "cuda") else []
    threads = _child_threads(study.parallel)
    print(f"{study.parallel} units at a time, {threads['OMP_NUM_THREADS']} CPU thread(s) each "
          f"(OMP_NUM_THREADS; set it to choose)", flush=True)
    while queue or running:
        while queue and len(running) < study.parallel:
            variant, seed = queue.pop(0)
            log = study.unit_dir(variant.name, seed) / "unit.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            slot = min(set(range(study.parallel)) - {item[4] for item in running})
            env = {**os.environ, **threads}
            if len(gpus) > 1:
                env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
            handle = open(log, "w")  # noqa: SIM115 (closed when the child ends)
            cmd = [sys.executable, "-m", "dylora_moe.study", "unit", str(config_path), variant.name, str(seed)]
            proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
            running.append((proc, handle, f"{variant.name}/seed{seed}", time.monotonic(), slot))
            where = f" on GPU {env['CUDA_VISIBLE_DEVICES']}" if len(gpus) > 1 else ""
            print(f"started {variant.name} seed {seed}{where} (log: {log})", flush=True)
        time.sleep(0.5)
        for item in list(running):
            proc, handle, name, began, _ = item
            if proc.poll() is not None:
                handle.close()
                running.remove(item)
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                print(f"{name}: {status} in {time.monotonic() - began:.0f}s", flush=True)
                if proc.returncode != 0:
                    failures.append(name)
    return failures


def _unit_main(argv: Sequence[str]) -> int:
    """``python -m dylora_moe.study unit STUDY_CONFIG_JSON VARIANT SEED``: one unit (used by --parallel)."""
    if len(argv) != 4 or argv[0] != "unit":
        print("usage: python -m dylora_moe.study unit STUDY_CONFIG_JSON VARIANT SEED", file=sys.stderr)
        return 2
    payload = json.loads(Path(argv[1]).read_text())
    study = StudyConfig.from_dict(payload["config"], argv[1])
    run_unit(study, study.variant(argv[2]), int(argv[3]), progress=False)
    return 0
