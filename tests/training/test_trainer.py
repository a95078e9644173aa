"""JointTrainer on a tiny random llama: loss falls, outputs and checkpoints, exact resume, grad checkpointing."""

from __future__ import annotations

import json

import pytest
import torch

from dylora_moe import CheckpointError, ConfigError, DyLoRAMoEForCausalLM
from dylora_moe.common.runs import ADAPTER_DIR, STATE_FILE, TRAIN_CONFIG_FILE
from dylora_moe.data import DataError
from dylora_moe.serialization import adapter_state_dict
from dylora_moe.training import JointTrainer, list_checkpoints
from dylora_moe.training.checkpoint import OPTIMIZER_FILE, RNG_FILE, SCHEDULER_FILE, write_manifest
from tests.tiny import make_base

from . import isolate_data_registry, tiny_config, tiny_model_and_tokenizer, write_data_dir

DOMAINS = ["code_alpaca", "mbpp"]


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    isolate_data_registry(monkeypatch)
    return write_data_dir(tmp_path / "data")


def run(config):
    return JointTrainer(config, *tiny_model_and_tokenizer()).train()


def trainable(model: DyLoRAMoEForCausalLM) -> dict[str, torch.Tensor]:
    wanted = {id(p) for p in model.trainable_parameters()}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in wanted}


def test_joint_run_learns_and_writes_all_outputs(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    trainer = JointTrainer(tiny_config(out, data_dir), *tiny_model_and_tokenizer())
    result = trainer.train()  # 6 steps, eval every 3, save every 2, keep 2
    printed = capsys.readouterr().out
    assert "Verifying trainable parameters" in printed and "truncated" in printed and "loss@0" in printed

    # held-out loss falls on both domains; eval at step 0, every 3 steps and at the end
    assert [h.step for h in result.eval_history] == [0, 3, 6]
    for name in DOMAINS:
        assert result.end_eval.domains[name].loss < result.start_eval.domains[name].loss
    assert result.train_time_s > 0 and result.global_step == result.total_steps == 6

    metrics = json.loads((out / "metrics.json").read_text())
    for name in DOMAINS:
        assert isinstance(metrics["eval_loss"]["start"][name], float)
        assert metrics["eval_loss"]["end"][name] == metrics[f"eval_loss.end.{name}"]
        share = metrics["expert_share"][name]
        assert len(share) == 2 and abs(sum(share) - 1) < 1e-6 and share == metrics[f"expert_share.{name}"]
        assert metrics["router_entropy"][name] >= 0
    assert [h["step"] for h in metrics["eval_history"]] == [0, 3, 6] and metrics["train_time_s"] > 0
    assert metrics["train_log"][-1]["tokens_per_s"] > 0
    # what the run trained and was evaluated on: counts and the digest of the token ids, and the special tokens
    assert metrics["data"]["train"]["sha256"] == result.format_stats.sha256 and len(result.format_stats.sha256) == 64
    assert metrics["data"]["validation"]["total"]["kept"] > 0 and metrics["data"]["validation"]["sha256"]
    assert metrics["special_tokens"]["eos"] == trainer._tokenizer.eos_token == "<eos>"
    assert metrics["versions"]["torch"] == torch.__version__ and metrics["versions"]["transformers"]
    assert (out / "routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((out / "tensorboard").iterdir())
    assert json.loads((out / TRAIN_CONFIG_FILE).read_text())["format_version"] == 1

    # only the last two checkpoints are kept, each complete; no temporary folder is left behind
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]
    for ckpt in list_checkpoints(out):
        for name in (STATE_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, RNG_FILE, TRAIN_CONFIG_FILE):
            assert (ckpt / name).is_file(), name
        assert (ckpt / ADAPTER_DIR / "dylora_moe_weights.safetensors").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    state = json.loads((out / "checkpoint-6" / STATE_FILE).read_text())
    assert state["global_step"] == 6 and state["sampler"]["position"] == 6 * 2 * 4 % state["sampler"]["num_samples"]

    # the final adapter loads onto a fresh copy of the base and equals the trained model
    loaded = DyLoRAMoEForCausalLM.from_pretrained(out / "final", base_model=make_base("llama"))
    assert loaded.maturity == [True, True] and loaded.routing_mode == "sparse"
    for (name, a), b in zip(trainable(loaded).items(), trainable(trainer.model).values()):
        assert torch.equal(a, b), name
    # the router's feature standardisation was calibrated on training examples and travels with the adapter
    assert "router calibrated on" in printed and trainer.model.routers[0].feature_mean.abs().sum() > 0
    assert torch.equal(loaded.routers[0].feature_mean, trainer.model.routers[0].feature_mean)
    assert torch.equal(loaded.routers[0].feature_std, trainer.model.routers[0].feature_std)


class Interrupt(Exception):
    pass


def interrupt_at_training_call(model, call: int) -> None:
    """Raise ``Interrupt`` at the ``call``-th training-mode forward of ``model`` (a simulated crash)."""
    seen = {"n": 0}

    def hook(module, args, kwargs):
        if module.training:
            seen["n"] += 1
            if seen["n"] == call:
                raise Interrupt
        return None

    model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.exact
@pytest.mark.parametrize("changes", [{}, {"moe.domain_mi_coef": 0.5, "moe.domain_mi_decay": 0.9},
                                     {"moe.expert_init": "svd", "moe.scaling": "goat", "moe.top_k": 2,
                                      "moe.router_context": "prompt"}],
                         ids=["plain", "running-domain-statistics", "goat-with-router-context"])
def test_interrupted_then_resumed_run_equals_uninterrupted(tmp_path, data_dir, capsys, changes):
    # dropout > 0 and several micro-batches per step, so RNG, optimizer, scheduler and data position all matter;
    # with the domain routing loss's running statistics, those too (saved in trainer_state.json)
    straight = JointTrainer(tiny_config(tmp_path / "a", data_dir, **changes), *tiny_model_and_tokenizer())
    straight.train()

    config = tiny_config(tmp_path / "b", data_dir, **changes)
    model, tokenizer = tiny_model_and_tokenizer()
    interrupt_at_training_call(model, call=2 * 4 + 2)  # second micro-batch of step 5 (after checkpoint-4)
    with pytest.raises(Interrupt):
        JointTrainer(config, model=model, tokenizer=tokenizer).train()
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["checkpoint-2", "checkpoint-4"]
    assert not (tmp_path / "b" / "final").exists()

    resumed = JointTrainer(config.replace(resume=True), *tiny_model_and_tokenizer())
    result = resumed.train()
    assert "resuming from" in capsys.readouterr().out and result.resumed_from.name == "checkpoint-4"

    a, b = trainable(straight.model), trainable(resumed.model)
    assert a.keys() == b.keys() and len(a) > 0
    a.update(adapter_state_dict(straight.model))  # router statistics and GOAT's frozen residuals too
    b.update(adapter_state_dict(resumed.model))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    metrics_a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    metrics_b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics_a["eval_history"] == metrics_b["eval_history"]
    if "moe.router_context" in changes:  # GOAT's residual and the routers' context input were saved and restored
        assert any(n.endswith("lora_residual_A") for n in a) and any(n.endswith("context_weight") for n in a)
    if "moe.domain_mi_decay" in changes:  # the running statistics: mutual information step by step, final state
        assert [r["domain_mi"] for r in metrics_a["train_log"]] == [r["domain_mi"] for r in metrics_b["train_log"]]
        assert all(r["domain_mi"] > 0 for r in metrics_a["train_log"])
        states = [json.loads((tmp_path / run / "checkpoint-6" / "trainer_state.json").read_text())["domain_routing"]
                  for run in ("a", "b")]
        assert states[0] == states[1] and states[0]["steps"] == 6


def test_resume_and_output_dir_guards(tmp_path, data_dir):
    config = tiny_config(tmp_path / "run", data_dir, **{"train.max_steps": 2})
    with pytest.raises(CheckpointError, match="no checkpoint-<step> folder to resume from"):
        run(config.replace(resume=True))
    run(config)
    with pytest.raises(ConfigError, match="already holds checkpoints.*--resume"):
        run(config)
    with pytest.raises(CheckpointError, match=r"different 'moe.r' \(checkpoint: 4, now: 8\); set moe.r=4"):
        run(config.replace(resume=True, **{"moe.r": 8}))
    result = run(config.replace(resume=True))  # already complete: nothing more to train, outputs rewritten
    assert result.global_step == 2 and (tmp_path / "run" / "metrics.json").is_file()
    again = run(config.replace(overwrite_output_dir=True))
    assert again.global_step == 2 and again.resumed_from is None


def test_a_run_that_fails_during_setup_leaves_the_output_dir_as_it_was(tmp_path, data_dir):
    """Bad data found after the output check: the folders the run created are removed again, and with
    overwrite_output_dir the earlier run's checkpoints are still there (they go only once setup succeeded)."""
    fresh = tiny_config(tmp_path / "new" / "deeper" / "run", tmp_path / "no-data", **{"train.max_steps": 2})
    with pytest.raises(DataError, match="no-data"):
        run(fresh)
    assert not (tmp_path / "new").exists()

    config = tiny_config(tmp_path / "run", data_dir, **{"train.max_steps": 2})
    run(config)
    before = sorted(p.relative_to(tmp_path / "run") for p in (tmp_path / "run").rglob("*"))
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == ["checkpoint-2"]
    with pytest.raises(DataError, match="no-data"):
        run(config.replace(overwrite_output_dir=True, **{"data.data_dir": str(tmp_path / "no-data")}))
    assert sorted(p.relative_to(tmp_path / "run") for p in (tmp_path / "run").rglob("*")) == before
    again = run(config.replace(overwrite_output_dir=True))  # and a good overwrite still starts afresh
    assert again.global_step == 2 and again.resumed_from is None


def test_a_run_saved_before_the_gate_field_resumes_only_with_the_probability_gate(tmp_path, data_dir):
    """Its saved config has no moe.gate; it was trained with the probability gate (the only one then), so a
    resume under today's default (straight-through) is refused by name instead of silently switching."""
    config = tiny_config(tmp_path / "run", data_dir, **{"train.max_steps": 2})
    run(config)
    (latest,) = list_checkpoints(tmp_path / "run")[-1:]
    saved = json.loads((latest / TRAIN_CONFIG_FILE).read_text())
    assert saved["config"]["moe"].pop("gate") == "straight_through"
    (latest / TRAIN_CONFIG_FILE).write_text(json.dumps(saved))  # as a version before the field wrote it
    write_manifest(latest)  # and its manifest agrees, as it would have
    with pytest.raises(CheckpointError, match=r"different 'moe.gate' \(checkpoint: 'probability', now: "
                       r"'straight_through'\); set moe.gate=probability"):
        run(config.replace(resume=True))
    trainer = JointTrainer(config.replace(resume=True, **{"moe.gate": "probability"}), *tiny_model_and_tokenizer())
    result = trainer.train()
    assert result.resumed_from == latest and trainer.model.moe_config.gate == "probability"


def test_gradient_checkpointing_keeps_gradients_flowing(tmp_path, data_dir):
    changes = {"train.max_steps": 2, "train.eval_every": 0, "moe.dropout": 0.0}
    plain = JointTrainer(tiny_config(tmp_path / "plain", data_dir, **changes), *tiny_model_and_tokenizer())
    plain.train()
    config = tiny_config(tmp_path / "ckpt", data_dir, **changes, **{"train.gradient_checkpointing": True})
    checkpointed = JointTrainer(config, *tiny_model_and_tokenizer())
    checkpointed.train()
    model = checkpointed.model
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.base_model.modules())
    # experts (B starts at zero) and the router moved, exactly as far as without checkpointing
    assert any(b.abs().sum() > 0 for layer in model.expert_layers for b in layer.lora_B)
    fresh = DyLoRAMoEForCausalLM(make_base("llama"), model.moe_config, mature=True)
    assert not torch.equal(model.routers[0].weight, fresh.routers[0].weight)
    a, b = trainable(plain.model), trainable(model)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("threshold,experts,skills", [(1.0, 2, ["code_alpaca", "mbpp"]), (-1.0, 1, ["code_alpaca"])])
def test_expert_growth_gives_novel_domains_their_own_expert(tmp_path, data_dir, capsys, threshold, experts, skills):
    from dylora_moe.continual import SkillLibrary

    config = tiny_config(tmp_path / "run", data_dir, **{
        "moe.num_experts": 1, "train.allow_expert_growth": True,
        "train.growth_threshold": threshold, "train.max_steps": 2, "train.save_every": 0, "train.eval_every": 0})
    result = run(config)
    printed = capsys.readouterr().out
    assert printed.count("growth: domain") == 2
    library = SkillLibrary.load(result.final_dir)
    assert library.names == skills and sorted(library.expert_of().values()) == list(range(experts))
    loaded = DyLoRAMoEForCausalLM.from_pretrained(result.final_dir, base_model=make_base("llama"))
    assert loaded.num_experts == experts and loaded.maturity == [True] * experts
    assert loaded.skill_library.names == skills


def test_route_by_domain_trains_each_domain_on_its_own_expert(tmp_path, data_dir, monkeypatch):
    """Oracle routing: the expert of a domain learns only from that domain (the router is not used)."""
    seen = []
    original = DyLoRAMoEForCausalLM.forward

    def recording(self, *args, forced_expert=None, **kwargs):
        seen.append(forced_expert)
        return original(self, *args, forced_expert=forced_expert, **kwargs)

    monkeypatch.setattr(DyLoRAMoEForCausalLM, "forward", recording)
    config = tiny_config(tmp_path / "run", data_dir, **{"train.route_by_domain": True, "train.max_steps": 2,
                                                        "train.eval_every": 0, "train.save_every": 0})
    trainer = JointTrainer(config, *tiny_model_and_tokenizer())
    result = trainer.train()
    tensors = [f for f in seen if isinstance(f, torch.Tensor)]
    assert tensors and len(tensors) == len(seen)  # every training and held-out forward was routed by domain
    assert {int(v) for f in tensors for v in f} == {0, 1}
    # the held-out evaluation routes by domain too: each domain's share is all on its own expert
    for index, name in enumerate(DOMAINS):
        share = result.end_eval.domains[name].expert_share
        assert share[index] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="route_by_domain.*one expert per domain"):
        tiny_config(tmp_path / "x", data_dir, **{"train.route_by_domain": True, "moe.num_experts": 3})


def test_metrics_record_the_peak_memory_of_training(tmp_path, data_dir):
    config = tiny_config(tmp_path / "run", data_dir, **{"train.max_steps": 1, "train.eval_every": 0})
    result = JointTrainer(config, *tiny_model_and_tokenizer()).train()
    peak = result.metrics["peak_memory_mib"]
    assert peak is not None and 10 < peak < 100_000  # a Linux CPU: the process's peak resident set, in MiB


def test_the_optimizer_is_the_fused_adamw_and_steps_as_the_plain_one(tmp_path, data_dir):
    trainer = JointTrainer(tiny_config(tmp_path / "run", data_dir), *tiny_model_and_tokenizer())
    model, _ = trainer._build_model()
    params = model.trainable_parameters()
    optimizer = trainer._optimizer(model)
    assert optimizer.defaults["fused"] is True
    torch.manual_seed(0)
    grads = [torch.randn_like(p) for p in params]
    plain = [p.detach().clone().requires_grad_() for p in params]
    before = [p.detach().clone() for p in params]
    reference = torch.optim.AdamW([{"params": [q for q, p in zip(plain, params) if p.dim() >= 2],
                                    "weight_decay": trainer.config.train.weight_decay},
                                   {"params": [q for q, p in zip(plain, params) if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=trainer.config.train.lr)
    for _ in range(3):
        for p, q, g in zip(params, plain, grads):
            p.grad, q.grad = g.clone(), g.clone()
        optimizer.step()
        reference.step()
    for p, q in zip(params, plain):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-7)
    assert all(not torch.equal(p.detach(), b) for p, b in zip(params, before))  # every parameter moved


def test_learned_thresholds_train_at_their_own_rate_and_the_log_reports_k(tmp_path, data_dir):
    config = tiny_config(tmp_path / "run", data_dir, **{
        "moe.top_k": 2, "moe.top_p": 0.6, "moe.threshold_learned": True, "moe.dynamic_k_coef": 0.5,
        "train.threshold_lr": 0.05, "train.eval_every": 0, "train.save_every": 0})
    trainer = JointTrainer(config, *tiny_model_and_tokenizer())
    model, _ = trainer._build_model()
    groups = trainer._optimizer(model).param_groups
    thresholds = {id(p) for p in model.threshold_parameters()}
    assert len(thresholds) == 2 and [g["lr"] for g in groups if {id(p) for p in g["params"]} == thresholds] == [0.05]
    assert all(g["lr"] == config.train.lr for g in groups if not {id(p) for p in g["params"]} & thresholds)

    result = JointTrainer(config, *tiny_model_and_tokenizer()).train()
    log = json.loads((tmp_path / "run" / "metrics.json").read_text())["train_log"]
    assert all(1.0 <= row["mean_k"] <= 2.0 for row in log)
    # 6 steps of Adam at 0.05 on the logit moved every threshold off its start (0.6)
    assert all(abs(row["threshold"] - 0.6) > 1e-3 for row in log[1:])
    saved = DyLoRAMoEForCausalLM.from_pretrained(tmp_path / "run" / "final", make_base("llama"))
    moved = torch.sigmoid(torch.cat(saved.threshold_parameters()).detach())
    assert not torch.allclose(moved, torch.full_like(moved, 0.6), atol=1e-3)
    assert log[-1]["threshold"] == pytest.approx(float(moved.mean()), abs=1e-6)
    assert all(d.active_experts is not None and 1.0 <= d.active_experts <= 2.0
               for d in result.end_eval.domains.values())


def test_the_domain_routing_loss_gets_the_domains_and_the_log_reports_it(tmp_path, data_dir):
    config = tiny_config(tmp_path / "run", data_dir, **{
        "moe.domain_mi_coef": 0.5, "train.eval_every": 0, "train.save_every": 0, "train.log_every": 1})
    JointTrainer(config, *tiny_model_and_tokenizer()).train()
    log = json.loads((tmp_path / "run" / "metrics.json").read_text())["train_log"]
    # two domains in the batches: a positive mutual information, at most ln 2
    assert len(log) == 6 and all(0.0 < row["domain_mi"] <= 0.6932 for row in log)
    plain = tiny_config(tmp_path / "plain", data_dir, **{"train.eval_every": 0, "train.save_every": 0})
    JointTrainer(plain, *tiny_model_and_tokenizer()).train()
    assert all("domain_mi" not in row
               for row in json.loads((tmp_path / "plain" / "metrics.json").read_text())["train_log"])
