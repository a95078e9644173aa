"""Prompts, stop sequences, code extraction, and batched generation with a tiny random model."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from dylora_moe.evaluation.benchmarks import Problem
from dylora_moe.evaluation.generation import (
    GenerationConfig,
    _stop_test,
    _StopCriteria,
    extract_code,
    fenced_blocks,
    generate_samples,
    plan_batches,
    render_prompt,
    resolve_prompt_style,
    sanitize_code,
    solution_for,
    truncate_at_stop,
)
from tests.tiny import make_base, randomize_experts

try:  # the tiny tokenizer lives in tests/tiny.py (it used to live in tests/data/conftest.py)
    from tests.tiny import CHAT_TEMPLATE, make_tokenizer
except ImportError:  # pragma: no cover
    from tests.data.conftest import CHAT_TEMPLATE, make_tokenizer

HE_PROMPT = 'from typing import List\n\n\ndef add(a: int, b: int) -> int:\n    """ Add a and b. """\n'


def he_problem(task: str = "HumanEval/900", prompt: str = HE_PROMPT, entry: str = "add") -> Problem:
    return Problem(task, "humaneval", prompt, f"Complete:\n{prompt}", entry, f"assert {entry}(1, 2) == 3\n", "")


def mbpp_problem(task: str = "MBPP/900") -> Problem:
    prompt = '"""\nWrite a function to add two numbers.\nassert add(1, 2) == 3\n"""\n'
    return Problem(task, "mbpp", prompt, "Write a function to add two numbers.", "add", "assert add(1, 2) == 3\n", "")


# ----------------------------------------------------------------------------- stop sequences
@pytest.mark.parametrize("text,expected", [
    ("    return a + b\n\ndef other():\n    pass", "    return a + b\n"),
    ("    return a + b\n\n\nif __name__ == '__main__':\n    main()", "    return a + b\n\n"),
    ("    return a + b\nprint(add(1, 2))\n# done", "    return a + b"),
    ("    return a + b\n", "    return a + b\n"),
    ("    x = 1  # a def in a comment\n    return x", "    x = 1  # a def in a comment\n    return x"),
])
def test_truncate_at_stop(text, expected):
    stops = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")
    assert truncate_at_stop(text, stops) == expected


def test_truncate_takes_the_earliest_stop():
    assert truncate_at_stop("a\nassert x\ndef f", ("\ndef ", "\nassert ")) == "a"
    assert truncate_at_stop("abc", ()) == "abc"


# ----------------------------------------------------------------------------- extraction
def test_fenced_blocks_languages_multiple_and_unclosed():
    text = "intro\n```python\nx = 1\n```\nmore\n```\ny = 2\n```\n```bash\nls\n```\n```py\nz = 3\n"
    assert fenced_blocks(text) == [("python", "x = 1\n"), ("", "y = 2\n"), ("bash", "ls\n"), ("py", "z = 3\n")]
    assert fenced_blocks("no code here") == []


def test_extract_single_fenced_block():
    reply = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nIt adds."
    assert extract_code(reply, "add") == "def add(a, b):\n    return a + b\n"


def test_extract_prefers_the_block_that_defines_the_entry_point():
    reply = ("First import:\n```python\nimport math\n```\nThen:\n```python\ndef add(a, b):\n    return a + b\n```\n"
             "Usage:\n```python\nprint(add(1, 2))\n```")
    assert extract_code(reply, "add") == "def add(a, b):\n    return a + b\n"
    assert extract_code(reply, "missing") == "import math\n"  # no block defines it: the first one


@pytest.mark.parametrize("reply", [
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n```\n\nThe output of this code will be `3`.",
    "def add(a, b):\n    return a + b\n```\nThe function `add` adds. ```python\nadd(1, 2)\n```",
    "Sure:\ndef add(a, b):\n    return a + b\n  ```\nIt returns the sum.",
])
def test_extract_code_written_before_a_lone_closing_fence(reply):
    """A reply that never opens a fence but closes its code with one: the prose after the fence is not code."""
    assert extract_code(reply, "add") == "def add(a, b):\n    return a + b\n"


def test_extract_skips_non_python_blocks():
    reply = "```bash\npip install x\n```\n```python\ndef add(a, b):\n    return a + b\n```"
    assert extract_code(reply, "") == "def add(a, b):\n    return a + b\n"


def test_extract_without_fence_starts_at_the_code_and_drops_trailing_prose():
    reply = "Sure! Here is the function:\ndef add(a, b):\n    return a + b\nThis returns the sum of a and b."
    assert extract_code(reply, "add") == "def add(a, b):\n    return a + b\n"


def test_extract_drops_demo_code_and_keeps_definitions():
    code = (
        "import math\nLIMIT = 3\n\n@staticmethod\ndef add(a, b):\n    # sum\n    return a + b\n\n"
        "print(add(1, 2))\nassert add(1, 2) == 3\nif __name__ == '__main__':\n    print(add(2, 2))\n"
    )
    expected = "import math\n\nLIMIT = 3\n\n@staticmethod\ndef add(a, b):\n    # sum\n    return a + b\n"
    assert sanitize_code(code) == expected
    assert extract_code(f"```python\n{code}```", "add").startswith("import math")


def test_extract_keeps_unparsable_code_unchanged_and_bodies_as_bodies():
    broken = "def add(a, b)\n    return a + b\n"
    assert extract_code(f"```python\n{broken}```", "add") == broken  # the sandbox reports syntax_error
    body = "    return a + b\n"
    assert extract_code(f"```python\n{body}```", "add") == body


def test_solution_for_completion_keeps_the_prompt_byte_for_byte():
    problem = he_problem()
    completion = "    return a + b\n"
    assert solution_for(problem, completion, "completion") == HE_PROMPT + completion
    mbpp = mbpp_problem()
    assert solution_for(mbpp, "def add(a, b):\n    return a + b\n", "completion").startswith(mbpp.prompt)


def test_solution_for_chat_humaneval_redefines_after_the_prompt():
    problem = he_problem()
    solution = solution_for(problem, "```python\ndef add(a, b):\n    return a + b\n```", "chat")
    assert solution.startswith(HE_PROMPT)  # imports and helpers of the prompt stay available
    assert solution.endswith("def add(a, b):\n    return a + b\n")
    namespace: dict = {}
    exec(compile(problem.program(solution), "<test>", "exec"), namespace)  # noqa: S102 - trusted test code
    body = solution_for(problem, "```python\n    return a + b\n```", "chat")
    assert body == HE_PROMPT + "    return a + b\n"
    mbpp = solution_for(mbpp_problem(), "```python\ndef add(a, b):\n    return a + b\n```", "chat")
    assert mbpp == "def add(a, b):\n    return a + b\n"


# ----------------------------------------------------------------------------- prompts
def test_prompt_style_follows_the_tokenizer():
    chat, plain = make_tokenizer(CHAT_TEMPLATE, eos="<|end|>"), make_tokenizer()
    assert resolve_prompt_style(chat) == "chat"
    assert resolve_prompt_style(plain) == "completion"
    assert resolve_prompt_style(chat, "completion") == "completion"
    with pytest.raises(ValueError, match="chat_template"):
        resolve_prompt_style(plain, "chat")
    problem = he_problem()
    assert render_prompt(problem, plain, "completion") == HE_PROMPT
    rendered = render_prompt(problem, chat, "chat")
    assert rendered.startswith("<|user|>\nComplete:") and rendered.endswith("<|assistant|>\n")
    assert render_prompt(problem, plain, "instruction").startswith("### Instruction:\nComplete:")


def test_generation_config_validation():
    with pytest.raises(ValueError, match="greedy"):
        GenerationConfig(n_samples=2).validate()
    with pytest.raises(ValueError):
        GenerationConfig(prompt_style="nope").validate()
    GenerationConfig(n_samples=4, temperature=0.8).validate()


# ----------------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def moe_model():
    model = DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(num_experts=3, r=4, alpha=8), mature=True)
    randomize_experts(model)
    return model.eval()


def _problems() -> list[Problem]:
    short = he_problem("HumanEval/901", "def add ( a , b ) :\n", "add")
    return [he_problem(), short, mbpp_problem()]


def test_greedy_generation_is_deterministic_and_batched(moe_model):
    tok = make_tokenizer()
    config = GenerationConfig(max_new_tokens=6, batch_size=2)
    first = generate_samples(moe_model, tok, _problems(), config)
    again = generate_samples(moe_model, tok, _problems(), GenerationConfig(max_new_tokens=6, batch_size=3))
    assert [s.task_id for s in first] == ["HumanEval/900", "HumanEval/901", "MBPP/900"]
    assert [s.completion for s in first] == [s.completion for s in again]  # batch composition does not matter
    for sample, problem in zip(first, _problems()):
        assert sample.prompt == problem.prompt and sample.solution == problem.prompt + sample.completion
        assert 0 <= sample.new_tokens <= 6


def test_plan_batches_keeps_one_long_prompt_from_padding_a_whole_batch():
    lengths = [1781, 242, 221, 203, 203, 202, 184, 183]  # the longest MBPP test prompts, chat style
    jobs = list(range(len(lengths)))
    assert plan_batches(jobs, lengths, batch_size=48) == [[0, 1], [2, 3, 4, 5, 6, 7]]
    assert plan_batches(jobs, lengths, batch_size=48, min_fill=0.0) == [jobs]  # plain fixed-size batches
    assert plan_batches(jobs, lengths, batch_size=3) == [[0, 1], [2, 3, 4], [5, 6, 7]]
    # smoothly decreasing lengths never end a batch early
    smooth = [100 - i for i in range(40)]
    assert [len(b) for b in plan_batches(list(range(40)), smooth, batch_size=16)] == [16, 16, 8]
    for size, fill in ((2, 0.9), (5, 1.0), (48, 0.95)):
        batches = plan_batches(jobs, lengths, size, fill)
        assert [j for b in batches for j in b] == jobs and max(map(len, batches)) <= size  # every job once, in order
        for b in batches:  # every batch keeps the fill, except a lone prompt
            assert len(b) == 1 or sum(lengths[j] for j in b) >= fill * len(b) * lengths[b[0]]
    assert plan_batches([], [], 4) == []


def test_batches_ended_early_give_the_same_replies(moe_model):
    tok = make_tokenizer()
    problems = _problems()
    long = he_problem("HumanEval/902", "def long ( a , b ) :\n" + "    # return a + b\n" * 12, "long")
    problems = [long, *problems]
    lengths = sorted((len(tok(render_prompt(p, tok, resolve_prompt_style(tok)))["input_ids"]) for p in problems),
                     reverse=True)
    assert len(plan_batches(list(range(4)), lengths, 4, 0.9)) > 1  # the long prompt really ends a batch early
    fixed = generate_samples(moe_model, tok, problems, GenerationConfig(max_new_tokens=5, batch_size=4, min_fill=0))
    split = generate_samples(moe_model, tok, problems, GenerationConfig(max_new_tokens=5, batch_size=4, min_fill=0.9))
    assert [(s.task_id, s.completion, s.expert) for s in split] == [(s.task_id, s.completion, s.expert) for s in fixed]
    with pytest.raises(ValueError, match="min_fill"):
        GenerationConfig(min_fill=1.5).validate()


def test_expert_choice_is_recorded_from_a_forward_on_the_prompt(moe_model):
    tok = make_tokenizer()
    problems = _problems()
    samples = generate_samples(moe_model, tok, problems, GenerationConfig(max_new_tokens=3, batch_size=4))
    for sample, problem in zip(samples, problems):
        ids = tok(problem.prompt, return_tensors="pt")
        out = moe_model(**ids)
        assert sample.expert == int(out.expert_choice[0])
        assert sample.router_probs == pytest.approx(out.router_probs[0].tolist(), abs=1e-5)
        assert sum(sample.router_probs) == pytest.approx(1.0, abs=1e-4)


def test_sampling_gives_n_samples_per_problem_and_a_plain_model_has_no_expert():
    tok = make_tokenizer(CHAT_TEMPLATE, eos="<|end|>")
    calls = []
    config = GenerationConfig(max_new_tokens=4, temperature=1.0, n_samples=3, batch_size=4, seed=1)
    samples = generate_samples(make_base("llama"), tok, _problems()[:2], config, on_batch=calls.append)
    assert [(s.task_id, s.index) for s in samples] == [("HumanEval/900", i) for i in range(3)] + [
        ("HumanEval/901", i) for i in range(3)]
    assert sum(len(c) for c in calls) == 6 and len(calls) == 2
    assert all(s.expert is None and s.router_probs is None for s in samples)
    assert all(s.prompt.startswith("<|user|>") for s in samples)
    again = generate_samples(make_base("llama"), tok, _problems()[:2], config)
    assert [s.completion for s in samples] == [s.completion for s in again]  # seeded


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level byte tokenizer that keeps whitespace (the word-level test tokenizer drops it)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(["<pad>", "<eos>", *alphabet])}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>")


@pytest.mark.parametrize("problem,expected", [(he_problem(), "return a"), (mbpp_problem(), "return a\ndef f")])
def test_stop_sequences_end_generation_early(problem, expected):
    """A scripted model repeats 'return a\\ndef f\\nassert x': HumanEval stops at '\\ndef ', MBPP at
    '\\nassert ' (a second function is allowed there), long before max_new_tokens."""
    tok = byte_tokenizer()

    class Scripted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = make_base("llama")
            self.script = tok("return a\ndef f\nassert x\n", add_special_tokens=False)["input_ids"]

        def generate(self, input_ids, attention_mask, max_new_tokens, stopping_criteria, **kwargs):
            out = input_ids
            for step in range(max_new_tokens):
                token = self.script[step % len(self.script)]
                out = torch.cat([out, torch.full((out.shape[0], 1), token)], dim=1)
                if all(stopping_criteria[0](out, None).tolist()):
                    break
            return out

    model = Scripted()
    [sample] = generate_samples(model, tok, [problem], GenerationConfig(max_new_tokens=200))
    assert sample.new_tokens < 30  # stopped by the stop sequence, not by max_new_tokens
    assert sample.completion == expected


@pytest.mark.parametrize("style,benchmark", [("chat", "humaneval"), ("completion", "humaneval"),
                                             ("completion", "mbpp")])
def test_stop_criteria_decoding_only_the_tail_stops_at_the_same_step_as_decoding_everything(style, benchmark):
    """Random replies over an alphabet dense in stop sequences and fences: the windowed check finishes every
    row at exactly the step where the whole-reply check first says done."""
    tok = byte_tokenizer()
    done, triggers = _stop_test(style, benchmark)
    rng = torch.Generator().manual_seed(0)
    pieces = ["`", "```", "\n", " ", "def ", "assert ", "print(", "#", "x", "python", "\n```", '"""', "class "]
    prompt = tok("p:", add_special_tokens=False)["input_ids"]
    rows = []
    for _ in range(24):
        text = "".join(pieces[int(i)] for i in torch.randint(len(pieces), (60,), generator=rng))
        rows.append(prompt + tok(text, add_special_tokens=False)["input_ids"][:150])
    width = min(len(r) for r in rows)
    ids = torch.tensor([r[:width] for r in rows])
    criteria = _StopCriteria(tok, len(prompt), done, triggers)
    expected_done = [None] * len(rows)
    stopped_at = [None] * len(rows)
    for length in range(len(prompt) + 1, width + 1):
        flags = criteria(ids[:, :length]).tolist()
        for row in range(len(rows)):
            if expected_done[row] is None and done(tok.decode(ids[row, len(prompt) : length])):
                expected_done[row] = length
            if flags[row] and stopped_at[row] is None:
                stopped_at[row] = length
    assert stopped_at == expected_done
    assert sum(s is not None for s in stopped_at) >= len(rows) // 2  # the alphabet really makes rows stop
