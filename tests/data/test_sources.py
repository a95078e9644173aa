"""Tests for dylora_moe.data.sources and errors: registry, splits, data-dir lookup, error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from dylora_moe.data import (
    DATA_DIR_ENV,
    DataError,
    DatasetSpec,
    Example,
    format_mbpp_instruction,
    get_spec,
    holdout_validation_indices,
    list_datasets,
    load_domains,
    load_examples,
    read_records,
    register_local_dataset,
    resolve_data_dir,
    sources,
)

from .conftest import MBPP_IDS, alpaca_records, mbpp_record, write_json, write_jsonl


# ----------------------------------------------------------------------------- DataError
def test_data_error_formats_location_and_field():
    err = DataError("missing field 'output'", path="d/code_alpaca.json", record=12, field="output")
    assert str(err) == "d/code_alpaca.json: record 12: missing field 'output'"
    assert isinstance(err, ValueError)
    assert (err.path, err.record, err.field, err.line) == (Path("d/code_alpaca.json"), 12, "output", None)
    err = DataError("expected a string, got int", path="train.jsonl", line=7, field="input")
    assert str(err) == "train.jsonl:7: field 'input': expected a string, got int"
    assert str(DataError("empty file", path="x.json")) == "x.json: empty file"
    assert str(DataError("plain")) == "plain"


# ----------------------------------------------------------------------------- registry / MBPP
def test_builtin_registry():
    assert {"code_alpaca", "mbpp"} <= set(list_datasets())
    spec = get_spec("mbpp", split="test")
    assert (spec.loader, spec.split, spec.domain_label) == ("mbpp", "test", "mbpp")
    assert get_spec("mbpp").split == "train"  # overrides do not leak into the registry
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        get_spec("nope")


@pytest.mark.parametrize(
    ("split", "ids"),
    [
        ("prompt", [1, 10]),
        ("test", [11, 200, 510]),
        ("validation", [511, 600]),
        ("train", [601, 700, 900, 974]),
        ("all", MBPP_IDS),
    ],
)
def test_mbpp_split_by_task_id(data_dir, split, ids):
    examples = load_examples("mbpp", data_dir, split=split)
    assert [ex.meta["task_id"] for ex in examples] == ids
    assert all(ex.domain == "mbpp" for ex in examples)


def test_mbpp_example_content(data_dir):
    ex = load_examples("mbpp", data_dir, split="train")[0]
    rec = mbpp_record(601)
    assert ex.instruction == (
        "You are an expert Python programmer, and here is your task: Write a function f number 601. "
        "Your code should pass these tests:\n\nassert f(1) == 602\nassert f(0) == 601"
    )
    assert ex.instruction == format_mbpp_instruction(rec["text"], rec["test_list"])
    assert ex.input == ""
    assert ex.output == "def f(x):\n    return x + 601"  # \r\n normalised
    assert ex.meta["test_list"] == rec["test_list"]
    assert ex.meta["task_id"] == 601


def test_mbpp_domain_label_and_limit(data_dir):
    examples = load_examples(
        DatasetSpec("py", loader="mbpp", domain="python", path="mbpp/mbpp.jsonl", split="all", limit=3),
        data_dir,
    )
    assert [ex.meta["task_id"] for ex in examples] == [1, 10, 11]
    assert {ex.domain for ex in examples} == {"python"}
    with pytest.raises(ValueError, match="'limit' must be a positive integer"):
        load_examples("mbpp", data_dir, limit=0)
    with pytest.raises(ValueError, match="unknown MBPP split 'dev'"):
        load_examples("mbpp", data_dir, split="dev")


# ----------------------------------------------------------------------------- instruction data
def test_code_alpaca_holdout_is_a_deterministic_partition(data_dir):
    train = load_examples("code_alpaca", data_dir)
    val = load_examples("code_alpaca", data_dir, split="validation")
    every = load_examples("code_alpaca", data_dir, split="all")
    assert len(every) == 40 and len(val) == 2 and len(train) == 38  # round(0.05 * 40) = 2
    assert sorted(ex.meta["index"] for ex in train + val) == list(range(40))
    assert [ex.meta["index"] for ex in val] == [
        ex.meta["index"] for ex in load_examples("code_alpaca", data_dir, split="validation")
    ]
    bigger = load_examples("code_alpaca", data_dir, split="validation", validation_size=10)
    assert len(bigger) == 10
    other_seed = load_examples("code_alpaca", data_dir, split="validation", validation_size=10, seed=1)
    assert {e.instruction for e in other_seed} != {e.instruction for e in bigger}
    first = train[0]
    assert (first.domain, first.instruction, first.output) == (
        "code_alpaca",
        "Write code number 0",
        "print(0)",
    )


def test_holdout_depends_on_content_not_order(tmp_path):
    records = alpaca_records(30)
    a = write_json(tmp_path / "a.json", records)
    b = write_json(tmp_path / "b.json", records[::-1])
    val_a = load_examples(DatasetSpec("a", path=a, split="validation", validation_size=0.2))
    val_b = load_examples(DatasetSpec("a", path=b, split="validation", validation_size=0.2))
    assert len(val_a) == 6
    assert {e.instruction for e in val_a} == {e.instruction for e in val_b}
    assert holdout_validation_indices(["x", "y", "z"], 0) == set()
    with pytest.raises(ValueError, match="validation_size"):
        holdout_validation_indices(["x"], 1.5)


def test_blank_records_are_skipped_unless_asked(tmp_path):
    records = [*alpaca_records(4), {"instruction": "Say nothing", "input": "", "output": "  "}]
    path = write_json(tmp_path / "blank.json", records)
    assert len(load_examples(DatasetSpec("b", path=path, split="all"))) == 4
    assert len(load_examples(DatasetSpec("b", path=path, split="all", skip_empty=False))) == 5


def test_local_jsonl_with_column_mapping(tmp_path):
    path = write_jsonl(
        tmp_path / "sql.jsonl",
        [
            {"question": "count rows", "answer": "SELECT COUNT(*) FROM t"},
            {"question": "all rows", "context": "table t", "answer": "SELECT * FROM t"},
        ],
    )
    register_local_dataset(
        "sql",
        path,
        columns={"instruction": "question", "input": "context", "output": "answer"},
        validation_size=0,
    )
    examples = load_examples("sql", split="all")
    assert [(e.domain, e.instruction, e.input, e.output) for e in examples] == [
        ("sql", "count rows", "", "SELECT COUNT(*) FROM t"),
        ("sql", "all rows", "table t", "SELECT * FROM t"),
    ]
    assert [e.meta["line"] for e in examples] == [1, 2]
    with pytest.raises(ValueError, match="unknown keys in 'columns': \\['prompt'\\]"):
        register_local_dataset("bad", path, columns={"prompt": "question"})


def test_load_domains_groups_by_label(data_dir, tmp_path):
    extra = write_json(tmp_path / "more.json", alpaca_records(3))
    register_local_dataset("more_alpaca", extra, domain="code_alpaca", validation_size=0)
    by_domain = load_domains(["mbpp", "code_alpaca", "more_alpaca"], data_dir)
    assert list(by_domain) == ["mbpp", "code_alpaca"]
    assert len(by_domain["mbpp"]) == 4 and len(by_domain["code_alpaca"]) == 38 + 3
    assert all(isinstance(e, Example) for e in by_domain["code_alpaca"])


# ----------------------------------------------------------------------------- data directory
def test_data_dir_argument_env_and_default(data_dir, tmp_path, monkeypatch):
    assert resolve_data_dir(data_dir) == data_dir.resolve()
    monkeypatch.setenv(DATA_DIR_ENV, str(data_dir))
    assert resolve_data_dir() == data_dir.resolve()
    assert len(load_examples("mbpp")) == 4
    monkeypatch.delenv(DATA_DIR_ENV)
    (tmp_path / "shared").mkdir()
    data_dir.rename(tmp_path / "shared" / "data")
    monkeypatch.setattr(sources, "CHECKOUT_DATA_DIR", tmp_path / "shared" / "data")
    for where in (tmp_path, tmp_path / "shared", Path("/")):  # the default does not depend on the working directory
        monkeypatch.chdir(where)
        assert resolve_data_dir() == (tmp_path / "shared" / "data").resolve()
        assert len(load_examples("mbpp", split="test")) == 3


def test_the_default_data_dir_is_beside_the_checkout():
    assert sources.CHECKOUT_DATA_DIR == Path(sources.__file__).resolve().parents[3].parent / "shared" / "data"


def test_missing_data_dir_and_file_messages(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CHECKOUT_DATA_DIR", tmp_path / "nowhere")
    with pytest.raises(DataError, match=f"no data directory found: {DATA_DIR_ENV} is not set .*--data-dir DIR"):
        resolve_data_dir()
    with pytest.raises(DataError) as info:
        load_examples("mbpp")
    assert "mbpp/mbpp.jsonl" in str(info.value) and DATA_DIR_ENV in str(info.value)
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "empty"))
    with pytest.raises(DataError) as info:
        load_examples("code_alpaca")
    msg = str(info.value)
    assert "file 'code_alpaca/code_alpaca_2k.json' not found in data directory" in msg
    assert str((tmp_path / "empty").resolve()) in msg and f"${DATA_DIR_ENV}" in msg
    with pytest.raises(DataError, match="does not exist"):
        resolve_data_dir(tmp_path / "missing")
    with pytest.raises(DataError, match="file not found"):
        load_examples(DatasetSpec("x", path=tmp_path / "nope.json"))


# ----------------------------------------------------------------------------- error catalogue
def _error_of(path: Path, **spec_fields) -> str:
    with pytest.raises(DataError) as info:
        load_examples(DatasetSpec("t", path=path, split="all", **spec_fields))
    return str(info.value)


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a" "output": "b"}\n')
    msg = _error_of(path)
    assert msg.startswith(f"{path}:3: malformed JSON (Expecting ',' delimiter")


def test_malformed_json_array(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "a",\n   "output": "b"},\n  {"instruction": }\n]\n')
    msg = _error_of(path)
    assert msg.startswith(f"{path}:4: malformed JSON (Expecting value")


def test_record_not_an_object(tmp_path):
    assert _error_of(write_json(tmp_path / "a.json", [{"instruction": "a", "output": "b"}, ["x"]])) == (
        f"{tmp_path / 'a.json'}: record 1: record is not a JSON object (got array)"
    )
    assert _error_of(write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}, 5])) == (
        f"{tmp_path / 'a.jsonl'}:2: record is not a JSON object (got int)"
    )
    assert _error_of(write_json(tmp_path / "o.json", {"instruction": "a"})).endswith(
        "o.json: expected a JSON array of records (or JSON Lines), got object"
    )


def test_missing_field_names_record_and_field(tmp_path):
    records = [*alpaca_records(12), {"instruction": "no answer", "input": ""}]
    path = write_json(tmp_path / "code_alpaca.json", records)
    assert _error_of(path) == f"{path}: record 12: missing field 'output'"
    path = write_jsonl(tmp_path / "m.jsonl", [{"question": "q", "answer": "a"}, {"question": "q"}])
    msg = _error_of(path, columns={"instruction": "question", "output": "answer"})
    assert msg == f"{path}:2: missing field 'answer' (mapped from 'output')"


def test_wrong_type_names_line_and_field(tmp_path):
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [{"instruction": "a", "output": "b"}, {"instruction": "a", "input": 3, "output": "b"}],
    )
    assert _error_of(path) == f"{path}:2: field 'input': expected a string, got int"
    path = write_json(tmp_path / "t.json", [{"instruction": ["a"], "output": "b"}])
    assert _error_of(path) == f"{path}: record 0: field 'instruction': expected a string, got array"


def test_empty_files(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n  \n")
    assert _error_of(empty) == f"{empty}: empty file"
    assert _error_of(write_json(tmp_path / "e.json", [])) == f"{tmp_path / 'e.json'}: no records (empty JSON array)"


def test_zero_examples_after_split(tmp_path):
    path = write_jsonl(tmp_path / "mbpp.jsonl", [mbpp_record(1), mbpp_record(2)])
    with pytest.raises(DataError) as info:
        load_examples(DatasetSpec("mbpp", loader="mbpp", path=path, split="train"))
    assert str(info.value).startswith(f"{path}: domain 'mbpp' has no examples in split 'train'")
    blank = write_json(tmp_path / "blank.json", [{"instruction": "a", "output": ""}])
    assert "domain 't' has no examples in split 'all'" in _error_of(blank)


def test_mbpp_field_errors(tmp_path):
    def mbpp_error(records):
        path = write_jsonl(tmp_path / "mbpp.jsonl", records)
        with pytest.raises(DataError) as info:
            load_examples(DatasetSpec("mbpp", loader="mbpp", path=path, split="all"))
        return str(info.value).replace(str(path), "mbpp.jsonl")

    bad_tests = {**mbpp_record(2), "test_list": "assert f(1) == 2"}
    assert mbpp_error([mbpp_record(1), bad_tests]) == (
        "mbpp.jsonl:2: field 'test_list': expected a list of strings, got string"
    )
    assert mbpp_error([{**mbpp_record(1), "task_id": "1"}]) == (
        "mbpp.jsonl:1: field 'task_id': expected an integer, got string"
    )
    no_code = {k: v for k, v in mbpp_record(3).items() if k != "code"}
    assert mbpp_error([mbpp_record(1), mbpp_record(2), no_code]) == "mbpp.jsonl:3: missing field 'code'"
    assert mbpp_error([mbpp_record(1), mbpp_record(1)]) == "mbpp.jsonl:2: field 'task_id': duplicate task_id 1"


def test_read_records_locations(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert [(r.data, r.line, r.index) for r in read_records(path)] == [({"a": 1}, 1, 0), ({"a": 2}, 3, 1)]
    lines_in_json = tmp_path / "r.json"  # JSON Lines under a .json name are accepted
    lines_in_json.write_text('{"a": 1}\n{"a": 2}\n')
    assert [(r.data, r.line) for r in read_records(lines_in_json)] == [({"a": 1}, 1), ({"a": 2}, 2)]
    array = write_json(tmp_path / "arr.json", [{"a": 1}])
    assert [(r.data, r.line, r.index) for r in read_records(array)] == [({"a": 1}, None, 0)]


def test_mbpp_lone_carriage_return_is_normalised(tmp_path):
    record = {**mbpp_record(601), "code": "def f(x):\r\n    return x\r", "test_setup_code": "a = 1\r\n"}
    path = write_jsonl(tmp_path / "mbpp.jsonl", [record])
    (ex,) = load_examples(DatasetSpec("mbpp", loader="mbpp", path=path))
    assert ex.output == "def f(x):\n    return x\n"
    assert ex.meta["test_setup_code"] == "a = 1\n"


# ----------------------------------------------------------------------------- real data
@pytest.mark.integration
def test_real_shared_data_counts(shared_data):
    counts = {
        s: len(load_examples("mbpp", shared_data, split=s)) for s in ("train", "test", "validation", "prompt", "all")
    }
    assert counts == {"train": 374, "test": 500, "validation": 90, "prompt": 10, "all": 974}
    alpaca = load_examples("code_alpaca", shared_data, split="all", skip_empty=False)
    assert len(alpaca) == 2017
    train = load_examples("code_alpaca", shared_data, skip_empty=False)
    val = load_examples("code_alpaca", shared_data, split="validation", skip_empty=False)
    assert len(train) + len(val) == 2017 and len(val) == round(0.05 * 2017)
    assert all("\r" not in ex.output for ex in load_examples("mbpp", shared_data, split="all"))
