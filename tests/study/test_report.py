"""The study report's pass@1 bars: a measurement that is missing is no bar, never a zero, and a single seed
has no whisker."""

from __future__ import annotations

import pytest

from dylora_moe.study.report import PassBar, _spread, pass_at_1_bars, plot_study


def _variant(pass_at_1: dict[str, list[float]]) -> dict:
    return {"pass_at_1": {b: _spread(values) for b, values in pass_at_1.items()}}


def test_pass_at_1_bars_skip_what_no_unit_measured_and_give_one_seed_no_whisker():
    quality = {"benchmarks": ["humaneval", "mbpp"],
               "variants": {"mix": _variant({"humaneval": [0.05, 0.07], "mbpp": [0.08]}),
                            "lora": _variant({"mbpp": [0.09, 0.08]}),
                            "sweep": _variant({})}}
    bars = pass_at_1_bars(quality)
    assert [(b.variant, b.benchmark, b.seeds) for b in bars] == [("mix", "humaneval", 2), ("mix", "mbpp", 1),
                                                                ("lora", "mbpp", 2)]
    assert bars[0].mean == pytest.approx(0.06) and bars[0].std == pytest.approx(0.0141421, rel=1e-5)
    assert bars[1] == PassBar("mix", "mbpp", 0.08, None, 1)
    assert bars[2].std == _spread([0.09, 0.08])["std"]


def test_pass_at_1_bars_are_empty_when_nothing_was_measured():
    assert pass_at_1_bars({"benchmarks": ["mbpp"], "variants": {"mix": _variant({})}}) == []


def test_plot_study_writes_no_pass_at_1_plot_without_a_measurement(tmp_path):
    variant = {"group": "main", "num_experts": 1, "eval_loss": {"mbpp": _spread([1.0])},
               "eval_curve": [{"step": 0, "mbpp": 1.2}, {"step": 2, "mbpp": 1.0}], "pass_at_1": {}}
    written = plot_study({"benchmarks": ["mbpp"], "variants": {"lora": variant}}, tmp_path)
    assert [p.name for p in written] == ["loss_curves.png"]
    assert (tmp_path / "loss_curves.png").stat().st_size > 0 and not (tmp_path / "pass_at_1.png").exists()
    variant["pass_at_1"] = {"mbpp": _spread([0.1])}
    written = plot_study({"benchmarks": ["mbpp"], "variants": {"lora": variant}}, tmp_path)
    assert [p.name for p in written] == ["loss_curves.png", "pass_at_1.png"]
    assert (tmp_path / "pass_at_1.png").stat().st_size > 0
