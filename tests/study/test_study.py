"""The quality study (dylora_moe.study) end to end on a tiny llama saved to disk and tiny data files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dylora_moe.cli import main
from dylora_moe.config import ConfigError
from dylora_moe.evaluation.compare import sign_test
from dylora_moe.study import (
    StudyConfig,
    StudyError,
    VariantConfig,
    default_variants,
    report,
    results_table,
    run_study,
    run_unit,
)
from dylora_moe.study import unit as unit_module
from tests.tiny import make_base, make_tokenizer
from tests.training import isolate_data_registry, write_data_dir


@pytest.fixture
def setup(tmp_path, monkeypatch):
    isolate_data_registry(monkeypatch)
    data_dir = write_data_dir(tmp_path / "data")
    base = tmp_path / "base"
    make_base("llama").save_pretrained(base)
    make_tokenizer().save_pretrained(base)
    train = {
        "model": str(base), "output_dir": "unused", "seed": 0,
        "moe": {"num_experts": 2, "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"data_dir": str(data_dir), "max_seq_length": 96, "eval_examples_per_domain": 4,
                 "eval_batch_size": 4},
        "train": {"lr": 1e-2, "per_device_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 3,
                  "warmup_steps": 1, "eval_every": 2, "save_every": 0, "log_every": 1,
                  "router_calibration_examples": 8},
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(train))
    study = {
        "train_config": str(path), "output_dir": str(tmp_path / "study"), "seeds": [0, 1],
        "variants": [
            {"name": "moe2", "description": "2 x r=4"},
            {"name": "lora_r8", "overrides": ["moe.num_experts=1", "moe.r=8", "moe.alpha=16"]},
            {"name": "coef_0", "overrides": ["moe.balance_coef=0.0"], "group": "balance_coef", "seeds": [0],
             "pass_at_1": False},
        ],
        "baseline": "lora_r8", "benchmarks": ["humaneval"], "eval_limit": 2, "max_new_tokens": 4,
        "eval_workers": 1, "analysis_examples": 4, "device": "cpu",
    }
    study_path = tmp_path / "study.yaml"
    study_path.write_text(yaml.safe_dump(study))
    return study_path, tmp_path / "study"


def test_study_runs_every_unit_and_aggregates(setup, capsys):
    study_path, out = setup
    assert main(["study", "--config", str(study_path), "--no-progress"]) == 0
    quality = json.loads((out / "quality.json").read_text())
    variants = quality["variants"]
    assert list(variants) == ["moe2", "lora_r8", "coef_0"]
    moe, lora, coef = variants["moe2"], variants["lora_r8"], variants["coef_0"]
    # equal adapter budgets: 2 experts x r=4 and one LoRA r=8
    assert moe["trainable_parameters"] == lora["trainable_parameters"] > 0
    assert (moe["num_experts"], lora["num_experts"]) == (2, 1)
    assert moe["seeds"] == [0, 1] and coef["seeds"] == [0]
    for v in (moe, lora):
        assert v["pass_at_1"]["humaneval"]["n"] == 2 and 0.0 <= v["pass_at_1"]["humaneval"]["mean"] <= 1.0
        assert v["steps"] == 3
        for domain in ("code_alpaca", "mbpp"):
            assert v["eval_loss"][domain]["n"] == 2 and v["eval_loss"][domain]["mean"] > 0
        assert [row["step"] for row in v["eval_curve"]] == [0, 2, 3]
    assert coef["pass_at_1"] == {}
    unit = json.loads((out / "moe2" / "seed0" / "unit.json").read_text())
    assert unit["moe"]["num_experts"] == 2 and unit["moe"]["routing"] == "token"  # the default
    # the two seeds differ (data order, init), so the spread is real
    assert moe["eval_loss"]["mbpp"]["std"] > 0
    assert lora["nmi"]["mean"] == 0.0 and lora["load_imbalance"]["mean"] == 1.0  # one expert takes all
    assert set(quality["vs_baseline"]) == {"moe2", "coef_0"}
    assert "pass@1.humaneval" in quality["vs_baseline"]["moe2"]
    unit = json.loads((out / "moe2" / "seed1" / "unit.json").read_text())
    assert unit["overrides"] == [] and len(unit["share_matrix"]) == 2 and len(unit["share_matrix"][0]) == 2
    rows = [json.loads(line) for line in (out / "moe2" / "seed0" / "eval" / "humaneval" / "results.jsonl").open()]
    assert len(rows) == 2 and all(r["expert"] in (0, 1) for r in rows)
    for name in ("loss_curves.png", "share_matrices.png", "pass_at_1.png", "results_table.md"):
        assert (out / name).stat().st_size > 0
    table = (out / "results_table.md").read_text()
    assert "### main" in table and "### balance_coef" in table and "`lora_r8`" in table
    assert "| `moe2` | 2 |" in capsys.readouterr().out
    # routing per decision: moe2 routes per token (the default), so its view differs from the per-example one
    assert unit["routing_unit"] == "token" and len(unit["decision_share_matrix"]) == 2
    assert all(sum(row) == pytest.approx(1.0, abs=1e-5) for row in unit["decision_share_matrix"])
    assert moe["decision_nmi"]["n"] == 2 and 0.0 <= moe["decision_nmi"]["mean"] <= 1.0
    assert 0.0 < moe["decision_entropy"]["mean"] <= 0.6932  # ln 2
    assert lora["decision_nmi"]["mean"] == 0.0 and lora["decision_entropy"]["mean"] == 0.0
    assert "NMI per decision" in table
    # the NMI per example with its bootstrap interval, per unit (mixtures only)
    low, high = unit["nmi_interval"]
    assert 0.0 <= low <= high <= 1.0 and len(unit["count_matrix"]) == 2
    assert [r["interval"] for r in moe["nmi_by_seed"]] == [
        json.loads((out / "moe2" / f"seed{s}" / "unit.json").read_text())["nmi_interval"] for s in (0, 1)]
    assert [r["interval"] for r in lora["nmi_by_seed"]] == [[0.0, 0.0], [0.0, 0.0]]  # one expert: no information
    nmi_section = table.split("### NMI per example by seed")[1]
    assert "`lora_r8`" not in nmi_section.split("###")[0]  # the table lists mixtures only
    assert f"| `moe2` | 1 | {unit['nmi']:.3f} | {low:.3f} – {high:.3f} |" in table
    # experts per decision: top-1 and a single LoRA use one; no threshold is learned
    assert moe["mean_k"]["mean"] == lora["mean_k"]["mean"] == 1.0 and unit["mean_k"] == 1.0
    assert unit["thresholds"] == [] and "mean k" in table
    # pass@1 paired problem by problem with the baseline, for both seeds (2 problems each)
    paired = quality["paired_pass_at_1"]
    assert set(paired) == {"moe2"} and paired["moe2"]["humaneval"]["seeds"] == [0, 1]
    row = paired["moe2"]["humaneval"]
    assert row["pairs"] == 4 == row["both"] + row["only_variant"] + row["only_baseline"] + row["neither"]
    assert "### pass@1 paired with `lora_r8`" in table

    # a second run resumes: complete units are not run again
    stamp = (out / "moe2" / "seed0" / "unit.json").stat().st_mtime_ns
    assert main(["study", "--config", str(study_path), "--no-progress"]) == 0
    assert (out / "moe2" / "seed0" / "unit.json").stat().st_mtime_ns == stamp


def test_parallel_units_run_in_their_own_processes(setup):
    study_path, out = setup
    study = StudyConfig.from_yaml(study_path, ["variants=[{name: moe2}, {name: lora_r8, overrides: "
                                               "[moe.num_experts=1, moe.r=8, moe.alpha=16]}]",
                                               "seeds=[0]", "parallel=2", "benchmarks=[]"])
    quality = run_study(study, progress=False)
    assert set(quality["variants"]) == {"moe2", "lora_r8"}
    assert (out / "moe2" / "seed0" / "unit.log").is_file()
    assert quality["variants"]["moe2"]["pass_at_1"] == {}


def test_a_unit_without_pass_at_1_resumes_from_its_adapter_and_only_evaluates(setup):
    """Losses first (benchmarks: []), pass@1 later: the second run does not train again, it evaluates the saved
    adapter and adds pass@1 to unit.json, keeping the losses and analysis of the first run."""
    study_path, out = setup
    one = ["variants=[{name: moe2}]", "seeds=[0]", "baseline=moe2"]
    run_study(StudyConfig.from_yaml(study_path, [*one, "benchmarks=[]"]), progress=False)
    unit_path = out / "moe2" / "seed0" / "unit.json"
    first = json.loads(unit_path.read_text())
    weights = out / "moe2" / "seed0" / "train" / "final" / "dylora_moe_weights.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert first["pass_at_1"] == {} and not (out / "moe2" / "seed0" / "eval").exists()
    quality = run_study(StudyConfig.from_yaml(study_path, one), progress=False)
    second = json.loads(unit_path.read_text())
    assert weights.stat().st_mtime_ns == stamp  # not trained again
    assert second["pass_at_1"]["humaneval"]["problems"] == 2 and second["pass_at_1"]["humaneval"]["eval_time_s"] > 0
    assert {k: v for k, v in second.items() if k != "pass_at_1"} == {k: v for k, v in first.items() if k != "pass_at_1"}
    assert quality["variants"]["moe2"]["pass_at_1"]["humaneval"]["n"] == 1
    assert (out / "moe2" / "seed0" / "eval" / "humaneval" / "results.jsonl").is_file()

    # a unit copied without its adapter (results kept, weights not) trains again rather than failing
    second.pop("pass_at_1")
    unit_path.write_text(json.dumps({**second, "pass_at_1": {}}))
    weights.unlink()
    again = run_unit(StudyConfig.from_yaml(study_path, one), VariantConfig("moe2"), 0, progress=False)
    assert weights.is_file() and again["pass_at_1"]["humaneval"]["problems"] == 2
    assert again["eval_loss_end"] == pytest.approx(first["eval_loss_end"])  # same seed, same data: same unit


def test_a_unit_trained_again_keeps_the_pass_at_1_it_measured_only_if_the_training_reproduces(setup, capsys):
    """A unit.json copied without its adapter trains again for the pass@1 it lacks; what it measured before is
    kept (noting the earlier losses) when the held-out losses reproduce, and measured again when they do not."""
    study_path, out = setup
    one = ["variants=[{name: moe2}]", "seeds=[0]", "baseline=moe2"]
    study = StudyConfig.from_yaml(study_path, one)
    first = run_unit(study, VariantConfig("moe2"), 0, progress=False)
    unit_path = out / "moe2" / "seed0" / "unit.json"
    weights = out / "moe2" / "seed0" / "train" / "final" / "dylora_moe_weights.safetensors"
    earlier_mbpp = {"pass@1": 0.5, "problems": 2, "verdicts": {"Mbpp/11": True, "Mbpp/12": False}}

    unit_path.write_text(json.dumps({**first, "pass_at_1": {"mbpp": earlier_mbpp}}))
    weights.unlink()
    again = run_unit(study, VariantConfig("moe2"), 0, progress=False)
    assert weights.is_file()  # trained again
    assert again["eval_loss_end"] == pytest.approx(first["eval_loss_end"], abs=1e-6)
    assert again["pass_at_1"]["mbpp"] == {**earlier_mbpp, "from_earlier_training": {
        "eval_loss_end": first["eval_loss_end"]}}
    assert again["pass_at_1"]["humaneval"]["verdicts"] == first["pass_at_1"]["humaneval"]["verdicts"]
    assert json.loads(unit_path.read_text()) == again

    shifted = {d: loss + 0.01 for d, loss in first["eval_loss_end"].items()}  # another training's losses
    unit_path.write_text(json.dumps({**first, "eval_loss_end": shifted, "pass_at_1": {"mbpp": earlier_mbpp}}))
    weights.unlink()
    capsys.readouterr()
    other = run_unit(study, VariantConfig("moe2"), 0, progress=False)
    assert "mbpp" not in other["pass_at_1"] and "humaneval" in other["pass_at_1"]
    assert "the pass@1 measured on that training (mbpp) is not kept" in capsys.readouterr().out


@pytest.mark.parametrize("changes,message", [
    ({"variants": [{"name": "a"}, {"name": "a"}], "baseline": "a"}, "unique"),
    ({"variants": [{"name": "a"}], "baseline": "b"}, "baseline 'b' is not a variant"),
    ({"benchmarks": ["humaneval", "apps"]}, "unknown benchmark"),
    ({"seeds": []}, "'seeds' is empty"),
    ({"parallel": 0}, "'parallel' must be >= 1"),
    ({"variants": [{"name": "../x"}], "baseline": "../x"}, "plain folder name"),
    ({"colour": "blue"}, "unknown key"),
    ({"variants": [{"overrides": []}]}, "'variants.0.name' is required"),
])
def test_bad_study_configs_name_the_problem(changes, message, tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(changes))
    with pytest.raises(ConfigError, match=message):
        StudyConfig.from_yaml(path)


def test_cli_reports_bad_study_config_without_traceback(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text("seeds: [0]\nparallel: -1\n")
    assert main(["study", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dylora-moe: error: ") and "parallel" in err and "Traceback" not in err


def test_default_study_is_the_issue_design():
    study = StudyConfig()
    study.validate()
    names = [v.name for v in default_variants()]
    assert names[:4] == ["moe4_seq", "moe4_token", "lora_r16", "lora_r64"]
    assert study.baseline == "lora_r64" and Path(study.train_config).name == "cpu-demo.yaml"
    groups = {v.group for v in study.variants}
    assert groups == {"main", "balance_coef", "temperature", "mixing", "gate"}
    assert isinstance(study.variants[0], VariantConfig)


def test_every_default_mixture_variant_names_its_routing_temperature_and_gate(tmp_path):
    """The published units must mean the same after the defaults change: each mixture pins routing, temperature
    and gate (a single LoRA has no choice to make: its one expert always has probability 1)."""
    study = StudyConfig(output_dir=str(tmp_path))
    moe = {v.name: study.unit_train_config(v, 0).moe for v in study.variants}
    routing = {name: cfg.routing for name, cfg in moe.items()}
    temperature = {name: cfg.temperature for name, cfg in moe.items()}
    for v in study.variants:
        if moe[v.name].num_experts > 1:
            assert any(o.startswith("moe.routing=") for o in v.overrides), v.name
            assert any(o.startswith("moe.temperature=") for o in v.overrides), v.name
            assert any(o.startswith("moe.gate=") for o in v.overrides), v.name
    assert temperature["temp_1"] == temperature["token_temp_1"] == 1.0 and temperature["temp_4"] == 4.0
    assert {temperature[n] for n in ("moe4_seq", "moe4_token", "coef_0", "coef_0.1", "concat")} == {2.0}
    assert routing["moe4_seq"] == "sequence" and routing["moe4_token"] == "token"
    assert {routing[n] for n in ("coef_0", "coef_0.001", "coef_0.1", "temp_1", "temp_4", "concat")} == {"sequence"}
    assert routing["token_temp_1"] == "token"
    gates = {name: cfg.gate for name, cfg in moe.items() if cfg.num_experts > 1}
    assert gates.pop("token_st") == "straight_through" and set(gates.values()) == {"probability"}
    assert routing["token_st"] == "token" and temperature["token_st"] == 1.0


def _fake_popen(children: list, polls_to_finish: int):
    """A stand-in for ``subprocess.Popen`` that records ``(cmd, env)`` and exits 0 on its n-th ``poll()``."""

    class FakeChild:
        def __init__(self, cmd, env, **kwargs):
            self.polls, self.returncode = 0, None
            children.append((cmd, env))

        def poll(self):
            self.polls += 1
            if self.polls >= polls_to_finish:
                self.returncode = 0
            return self.returncode

    return FakeChild


def test_parallel_units_get_their_own_gpu_round_robin(setup, monkeypatch, capsys):
    """With several visible GPUs each running unit is pinned to one (CUDA_VISIBLE_DEVICES), reusing a slot only
    after its unit ended; the children are faked, so this runs without a GPU."""
    import dylora_moe.study.runner as study_module

    study_path, out = setup
    study = StudyConfig.from_yaml(study_path, ["seeds=[0, 1, 2]", "parallel=2", "variants=[{name: moe2}]",
                                               "device=auto", "baseline=moe2"])
    children = []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    monkeypatch.setattr(study_module.subprocess, "Popen", _fake_popen(children, polls_to_finish=2))
    monkeypatch.setattr(study_module.time, "sleep", lambda s: None)
    failures = study_module._run_parallel(study, out / "config.json", study.units())
    assert failures == []
    launched = [(cmd[-1], env.get("CUDA_VISIBLE_DEVICES")) for cmd, env in children]
    assert launched[:2] == [("0", "4"), ("1", "6")]  # seeds 0 and 1 at once, one GPU each
    assert launched[2][0] == "2" and launched[2][1] in ("4", "6")
    assert "on GPU 4" in capsys.readouterr().out
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # one GPU: the environment is left alone
    children.clear()
    study_module._run_parallel(study, out / "config.json", study.units()[:1])
    assert [(cmd[-1], env.get("CUDA_VISIBLE_DEVICES")) for cmd, env in children] == [("0", "0")]


def test_parallel_units_share_the_cpu_cores(setup, monkeypatch, capsys):
    """Each child gets its share of the usable cores as OMP_NUM_THREADS / MKL_NUM_THREADS (at least one), so
    that parallel units do not each start a thread per core; a thread count the user set is passed on as is."""
    import dylora_moe.study.runner as study_module

    study_path, out = setup
    study = StudyConfig.from_yaml(study_path, ["seeds=[0, 1, 2]", "parallel=3", "variants=[{name: moe2}]",
                                               "device=cpu", "baseline=moe2"])
    children = []
    for name in study_module.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(study_module.subprocess, "Popen", _fake_popen(children, polls_to_finish=1))
    monkeypatch.setattr(study_module.time, "sleep", lambda s: None)
    monkeypatch.setattr(study_module, "_usable_cpus", lambda: 16)
    assert study_module._run_parallel(study, out / "config.json", study.units()) == []
    assert [(e["OMP_NUM_THREADS"], e["MKL_NUM_THREADS"]) for _, e in children] == [("5", "5")] * 3  # 16 cores // 3
    assert "3 units at a time, 5 CPU thread(s) each" in capsys.readouterr().out
    monkeypatch.setattr(study_module, "_usable_cpus", lambda: 2)  # more units than cores: one thread each
    children.clear()
    study_module._run_parallel(study, out / "config.json", study.units())
    assert {e["OMP_NUM_THREADS"] for _, e in children} == {"1"}
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # the user's choice is kept
    children.clear()
    study_module._run_parallel(study, out / "config.json", study.units()[:1])
    env = children[0][1]
    assert env["OMP_NUM_THREADS"] == "7" and env["MKL_NUM_THREADS"] == "1"


def test_report_refuses_units_trained_on_different_tokens(setup, capsys):
    """Units record the digest of their token ids; a unit made with another tokenization (or an older unit that
    did not record one) is not averaged in with the others: the report names the units instead."""
    study_path, out = setup
    two = ["variants=[{name: moe2}, {name: lora_r8, overrides: [moe.num_experts=1, moe.r=8, moe.alpha=16]}]",
           "seeds=[0]", "benchmarks=[]"]
    quality = run_study(StudyConfig.from_yaml(study_path, two), progress=False)
    unit_path = out / "lora_r8" / "seed0" / "unit.json"
    unit = json.loads(unit_path.read_text())
    metrics = json.loads((out / "lora_r8" / "seed0" / "train" / "metrics.json").read_text())
    assert unit["data_sha256"] == {s: metrics["data"][s]["sha256"] for s in ("train", "validation")}
    assert quality["data_sha256"] == unit["data_sha256"]  # both units saw the same tokens
    assert unit["special_tokens"]["eos"] == "<eos>"

    unit_path.write_text(json.dumps({**unit, "data_sha256": {"train": "f" * 64, "validation": "0" * 64}}))
    with pytest.raises(StudyError, match=r"different token sequences.*moe2/seed0.*train ffffffffffff.*lora_r8/seed0"):
        run_study(StudyConfig.from_yaml(study_path, two), progress=False, report_only=True)
    unit.pop("data_sha256")  # a unit of the first format
    unit_path.write_text(json.dumps(unit))
    assert main(["study", "--config", str(study_path), *two, "--report-only"]) == 2
    assert "not recorded: lora_r8/seed0" in capsys.readouterr().err


def test_mean_k_of_units_written_before_it_was_recorded_comes_from_their_fixed_k():
    from dylora_moe.study.report import _mean_k

    assert _mean_k({"mean_k": 1.37, "num_experts": 4, "moe": {"top_k": 2, "top_p": 0.5}}) == 1.37
    assert _mean_k({"num_experts": 4, "moe": {"top_k": 2, "top_p": None}}) == 2.0
    assert _mean_k({"num_experts": 4, "moe": {"top_k": 1, "routing_mode": "dense"}}) == 4.0
    assert _mean_k({"num_experts": 4, "moe": {"top_k": 2, "top_p": 0.5}}) is None  # dynamic: not known


def test_results_table_says_when_pass_at_1_covers_fewer_seeds_than_the_losses():
    """Losses of 3 seeds next to pass@1 of 2 (a study cut short): the cell names how many seeds it averages."""
    def spread(mean, std, n):
        return {"mean": mean, "std": std, "min": mean, "max": mean, "n": n}

    row = {"group": "main", "seeds": [0, 1, 2], "trainable_parameters": 1000,
           "eval_loss": {"a": spread(0.75, 0.002, 3)}, "nmi": spread(0.3, 0.01, 3),
           "router_entropy": spread(1.0, 0.0, 3), "load_imbalance": spread(1.4, 0.0, 3),
           "train_time_s": spread(170.0, 1.0, 3)}
    quality = {"benchmarks": ["humaneval", "mbpp"], "variants": {
        "part": {**row, "pass_at_1": {"humaneval": spread(0.058, 0.004, 2)}},
        "full": {**row, "pass_at_1": {"humaneval": spread(0.061, 0.009, 3)}}}}
    lines = results_table(quality).splitlines()
    assert "pass@1 humaneval" in lines[2] and "pass@1 mbpp" not in lines[2]  # no unit measured MBPP
    part = next(line for line in lines if line.startswith("| `part`"))
    full = next(line for line in lines if line.startswith("| `full`"))
    assert "| 0.058 ± 0.004 (2 of 3 seeds) |" in part
    assert "| 0.061 ± 0.009 |" in full and "of 3 seeds" not in full
    assert "| 0.7500 ± 0.0020 |" in part


def _write_verdicts(path: Path, passed: dict[str, bool]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"task_id": t, "sample": 0, "status": "passed" if ok else "failed"} for t, ok in passed.items()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_paired_pass_at_1_counts_problems_only_one_side_solves(setup):
    """The paired comparison reads each unit's per-problem verdicts: counts are pooled over the seeds both
    sides measured, a seed whose results are gone is left out, and the sign test is on the discordant pairs."""
    study_path, out = setup
    two = ["variants=[{name: moe2}, {name: lora_r8, overrides: [moe.num_experts=1, moe.r=8, moe.alpha=16]}]",
           "benchmarks=[humaneval]"]
    study = StudyConfig.from_yaml(study_path, two)
    run_study(study, progress=False)
    tasks = [f"T/{i}" for i in range(8)]
    mine = {0: [1, 1, 1, 1, 1, 0, 0, 0], 1: [1, 1, 0, 0, 0, 0, 0, 0]}
    theirs = {0: [1, 0, 0, 0, 0, 0, 0, 1], 1: [0, 0, 0, 0, 0, 0, 0, 0]}
    for seed in (0, 1):
        _write_verdicts(out / "moe2" / f"seed{seed}" / "eval" / "humaneval" / "results.jsonl",
                        dict(zip(tasks, map(bool, mine[seed]))))
        _write_verdicts(out / "lora_r8" / f"seed{seed}" / "eval" / "humaneval" / "results.jsonl",
                        dict(zip(tasks, map(bool, theirs[seed]))))
    row = report(study)["paired_pass_at_1"]["moe2"]["humaneval"]
    # seed 0: both 1, only moe2 4, only lora 1, neither 2; seed 1: only moe2 2, neither 6
    assert (row["both"], row["only_variant"], row["only_baseline"], row["neither"]) == (1, 6, 1, 8)
    assert row["pairs"] == 16 and row["seeds"] == [0, 1]
    assert row["p_value"] == pytest.approx(sign_test(6, 1)) == pytest.approx(2 * 8 / 128)
    table = (out / "results_table.md").read_text()
    assert "| `moe2` | humaneval | 2 | 16 | 6 | 1 | 1 | 0.12 |" in table
    (out / "lora_r8" / "seed1" / "eval" / "humaneval" / "results.jsonl").unlink()
    unit_path = out / "lora_r8" / "seed1" / "unit.json"  # and the verdicts unit.json kept of them
    unit = json.loads(unit_path.read_text())
    del unit["pass_at_1"]["humaneval"]["verdicts"]
    unit_path.write_text(json.dumps(unit))
    row = report(study)["paired_pass_at_1"]["moe2"]["humaneval"]
    assert row["seeds"] == [0] and (row["only_variant"], row["only_baseline"]) == (4, 1)


def test_units_keep_their_verdicts_so_pairing_survives_the_eval_folders(setup):
    """unit.json keeps each pass@1's per-problem verdicts (those of results.jsonl); with every eval/ folder gone
    (units evaluated on another machine), the paired comparison reads them from unit.json and counts the same."""
    import shutil

    from dylora_moe.evaluation.compare import read_verdicts

    study_path, out = setup
    two = ["variants=[{name: moe2}, {name: lora_r8, overrides: [moe.num_experts=1, moe.r=8, moe.alpha=16]}]",
           "benchmarks=[humaneval]"]
    study = StudyConfig.from_yaml(study_path, two)
    run_study(study, progress=False)
    for name in ("moe2", "lora_r8"):
        for seed in (0, 1):
            unit = json.loads((out / name / f"seed{seed}" / "unit.json").read_text())
            kept = unit["pass_at_1"]["humaneval"]["verdicts"]
            assert kept == read_verdicts(out / name / f"seed{seed}" / "eval" / "humaneval") and len(kept) == 2
    # give the units other verdicts than their real ones, so the counts show where they were read from
    tasks = sorted(kept)
    for name, seed, passed in (("moe2", 0, [True, True]), ("moe2", 1, [True, False]),
                               ("lora_r8", 0, [False, True]), ("lora_r8", 1, [False, False])):
        unit_path = out / name / f"seed{seed}" / "unit.json"
        unit = json.loads(unit_path.read_text())
        unit["pass_at_1"]["humaneval"]["verdicts"] = dict(zip(tasks, passed))
        unit_path.write_text(json.dumps(unit))
        shutil.rmtree(out / name / f"seed{seed}" / "eval")
    row = report(study)["paired_pass_at_1"]["moe2"]["humaneval"]
    assert row["seeds"] == [0, 1] and row["pairs"] == 4
    assert (row["both"], row["only_variant"], row["only_baseline"], row["neither"]) == (1, 2, 0, 1)
    # a unit that kept no verdicts (from before they were kept) and has no results is left out
    unit_path = out / "lora_r8" / "seed1" / "unit.json"
    unit = json.loads(unit_path.read_text())
    del unit["pass_at_1"]["humaneval"]["verdicts"]
    unit_path.write_text(json.dumps(unit))
    row = report(study)["paired_pass_at_1"]["moe2"]["humaneval"]
    assert row["seeds"] == [0] and (row["both"], row["only_variant"], row["only_baseline"]) == (1, 1, 0)


def test_a_unit_from_before_the_per_decision_view_is_analysed_again_not_retrained(setup):
    """A unit.json without the per-decision routing view gets it from its saved adapter (no training); without
    the adapter it is kept as it is, and the report shows the view as unknown for token routing."""
    study_path, out = setup
    one = ["variants=[{name: moe2}]", "seeds=[0]", "baseline=moe2", "benchmarks=[]"]
    run_study(StudyConfig.from_yaml(study_path, one), progress=False)
    unit_path = out / "moe2" / "seed0" / "unit.json"
    fresh = json.loads(unit_path.read_text())
    old = {k: v for k, v in fresh.items() if not k.startswith("decision_") and k != "routing_unit"}
    unit_path.write_text(json.dumps(old))
    weights = out / "moe2" / "seed0" / "train" / "final" / "dylora_moe_weights.safetensors"
    stamp = weights.stat().st_mtime_ns
    quality = run_study(StudyConfig.from_yaml(study_path, one), progress=False)
    again = json.loads(unit_path.read_text())
    assert weights.stat().st_mtime_ns == stamp  # not trained again
    assert again["decision_nmi"] == pytest.approx(fresh["decision_nmi"])
    assert again["decision_share_matrix"] == fresh["decision_share_matrix"]
    assert again["eval_loss_end"] == fresh["eval_loss_end"]
    assert quality["variants"]["moe2"]["decision_nmi"]["n"] == 1

    # a sequence-routed unit needs no second analysis: a decision is an example, the report falls back
    sequence = {**old, "moe": {**old["moe"], "routing": "sequence"}}
    unit_path.write_text(json.dumps(sequence))
    stamp = unit_path.stat().st_mtime_ns
    quality = run_study(StudyConfig.from_yaml(study_path, one), progress=False)
    assert unit_path.stat().st_mtime_ns == stamp
    assert quality["variants"]["moe2"]["decision_nmi"]["mean"] == old["nmi"]

    unit_path.write_text(json.dumps(old))
    weights.unlink()  # copied without its adapter: nothing to analyse, the unit is kept as it is
    quality = run_study(StudyConfig.from_yaml(study_path, one), progress=False)
    assert json.loads(unit_path.read_text()) == old and not weights.exists()
    assert quality["variants"]["moe2"]["decision_nmi"]["n"] == 0  # token routing: unknown, not the example view
    assert "| – |" in (out / "results_table.md").read_text()


def test_per_decision_view_of_old_units_falls_back_only_where_a_decision_is_an_example():
    from dylora_moe.study.records import per_decision

    old = {"num_experts": 4, "nmi": 0.3, "router_entropy": 0.9, "share_matrix": [[1.0, 0.0]], "overrides": []}
    assert per_decision({**old, "moe": {"routing": "sequence"}}, "nmi") == 0.3
    assert per_decision({**old, "overrides": ["moe.routing=sequence"]}, "entropy") == 0.9
    assert per_decision({**old, "moe": {"routing": "token"}}, "nmi") is None
    assert per_decision({**old, "overrides": ["moe.routing=token"]}, "share_matrix") is None
    assert per_decision({**old, "num_experts": 1}, "share_matrix") == [[1.0, 0.0]]
    assert per_decision({**old, "decision_nmi": 0.01}, "nmi") == 0.01


def test_nmi_interval_of_old_units_comes_from_their_analysis_counts(tmp_path):
    from dylora_moe.evaluation.nmi import nmi_interval
    from dylora_moe.study.records import nmi_interval_of

    old = {"num_experts": 4, "nmi": 0.3}
    assert nmi_interval_of(old, tmp_path) is None  # no counts anywhere
    counts = [[30, 5, 5, 0], [4, 20, 10, 6]]
    (tmp_path / "analysis").mkdir()
    (tmp_path / "analysis" / "analysis.json").write_text(json.dumps({"count_matrix": counts}))
    assert nmi_interval_of(old, tmp_path) == list(nmi_interval(counts))
    assert nmi_interval_of({**old, "nmi_interval": [0.1, 0.2]}, tmp_path) == [0.1, 0.2]  # recorded: kept
    assert nmi_interval_of({**old, "num_experts": 1}, tmp_path) is None


def test_old_units_routing_comes_from_their_saved_train_config(tmp_path):
    """Units from before unit.json recorded the moe config, with routing left to the default of the day: their
    train/train_config.json says what they used."""
    from dylora_moe.study.records import per_decision

    old = {"num_experts": 4, "nmi": 0.3, "router_entropy": 0.9, "share_matrix": [[1.0, 0.0]], "overrides": []}
    assert per_decision(old, "nmi", tmp_path) is None  # nothing says: unknown
    (tmp_path / "train").mkdir()
    for routing, expected in (("sequence", 0.3), ("token", None)):
        saved = {"format_version": 1, "config": {"moe": {"routing": routing}}}
        (tmp_path / "train" / "train_config.json").write_text(json.dumps(saved))
        assert per_decision(old, "nmi", tmp_path) == expected


def test_a_unit_that_died_after_training_is_analysed_from_its_adapter_not_retrained(setup):
    """Training finished (final adapter and metrics.json written) but the unit died before unit.json: the next
    run reuses that training. An unfinished run, or one trained with other settings, trains again."""
    study_path, out = setup
    one = ["variants=[{name: moe2}]", "seeds=[0]", "baseline=moe2", "benchmarks=[]"]
    run_study(StudyConfig.from_yaml(study_path, one), progress=False)
    unit_path = out / "moe2" / "seed0" / "unit.json"
    first = json.loads(unit_path.read_text())
    weights = out / "moe2" / "seed0" / "train" / "final" / "dylora_moe_weights.safetensors"
    stamp = weights.stat().st_mtime_ns

    unit_path.unlink()  # died in the routing analysis
    again = run_unit(StudyConfig.from_yaml(study_path, one), VariantConfig("moe2"), 0, progress=False)
    assert weights.stat().st_mtime_ns == stamp  # not trained again
    assert {k: v for k, v in again.items() if k != "unit_time_s"} == {
        k: v for k, v in first.items() if k != "unit_time_s"}
    metrics_path = weights.parent.parent / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    assert again["unit_time_s"] > metrics["wall_time_s"]  # the reused training's time counts

    saved_path = weights.parent.parent / "train_config.json"  # finished by resuming it: the same training
    saved = json.loads(saved_path.read_text())
    saved["config"].update(resume=True, overwrite_output_dir=False)
    saved_path.write_text(json.dumps(saved))
    unit_path.unlink()
    run_unit(StudyConfig.from_yaml(study_path, one), VariantConfig("moe2"), 0, progress=False)
    assert weights.stat().st_mtime_ns == stamp  # not trained again

    metrics_path.write_text(json.dumps({**metrics, "global_step": metrics["total_steps"] - 1}))  # cut short
    unit_path.unlink()
    run_unit(StudyConfig.from_yaml(study_path, one), VariantConfig("moe2"), 0, progress=False)
    assert weights.stat().st_mtime_ns != stamp  # trained again
    stamp = weights.stat().st_mtime_ns

    unit_path.unlink()  # now the study asks for other settings than the saved run had
    other = run_unit(StudyConfig.from_yaml(study_path, [*one, "overrides=[train.lr=0.05]"]), VariantConfig("moe2"),
                     0, progress=False)
    assert weights.stat().st_mtime_ns != stamp and other["eval_loss_end"] != first["eval_loss_end"]


def test_exact_match_mean_loss_peak_memory_and_an_oracle_unit(setup, monkeypatch):
    """The domain study's additions: numeric exact match per domain, the mean held-out loss over domains, the
    training's peak memory, and an oracle unit whose evaluations go to the expert of the domain."""
    study_path, out = setup
    study = StudyConfig.from_yaml(study_path, ["seeds=[0]", "exact_match=[mbpp]", "exact_match_limit=3",
                                               "baseline=moe2"])
    study.variants = [VariantConfig("moe2"), VariantConfig("oracle", ["train.route_by_domain=true"])]
    experts = []
    original = unit_module.exact_match

    def recording(*args, forced_expert=None, **kwargs):
        experts.append(forced_expert)
        return original(*args, forced_expert=forced_expert, **kwargs)

    monkeypatch.setattr(unit_module, "exact_match", recording)
    quality = run_study(study, progress=False)
    for name in ("moe2", "oracle"):
        unit = json.loads((out / name / "seed0" / "unit.json").read_text())
        assert unit["exact_match"]["mbpp"]["total"] == 3 and 0 <= unit["exact_match"]["mbpp"]["exact_match"] <= 1
        assert unit["peak_memory_mib"] > 0
        v = quality["variants"][name]
        assert v["mean_eval_loss"]["mean"] == pytest.approx(
            (v["eval_loss"]["code_alpaca"]["mean"] + v["eval_loss"]["mbpp"]["mean"]) / 2)
        assert v["exact_match"]["mbpp"]["n"] == 1
    assert experts == [None, 1]  # the oracle's MBPP answers come from the MBPP expert (the second dataset)
    assert "exact match mbpp" in results_table(quality) and "mean loss" in results_table(quality)
    for name, expert in (("moe2", None), ("oracle", 1)):
        summary = json.loads((out / name / "seed0" / "eval" / "humaneval" / "summary.json").read_text())
        assert summary["forced_expert"] == expert
        rows = [json.loads(line) for line in (out / name / "seed0" / "eval" / "humaneval" / "results.jsonl").open()]
        if expert is not None:  # the generation's routing record says every prompt went to that expert
            assert {row["expert"] for row in rows} == {expert}


CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("study*.yaml")))
def test_every_shipped_study_config_builds_the_train_config_of_each_unit(name, monkeypatch):
    """A study config in configs/ that would fail on its 10th unit fails here: every unit's TrainConfig builds."""
    monkeypatch.chdir(CONFIGS.parent)
    study = StudyConfig.from_yaml(CONFIGS / name)
    units = study.units()
    assert units and {v.name for v, _ in units} == {v.name for v in study.variants}
    for variant, seed in units:
        config = study.unit_train_config(variant, seed)
        assert config.seed == seed and str(config.output_dir).endswith(f"{variant.name}/seed{seed}/train")
