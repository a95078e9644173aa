"""The README's library snippet runs as written (on the real default model: an integration test)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def library_snippet() -> str:
    text = README.read_text()
    section = text[text.index("## Use it as a library"):]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


@pytest.mark.integration
def test_the_readme_library_snippet_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it writes ckpt/ and expert0/ where it runs
    scope: dict = {}
    exec(compile(library_snippet(), str(README), "exec"), scope)
    assert scope["created"] is True and scope["model"].skill_library.names == ["sql"]
    assert (tmp_path / "ckpt" / "dylora_moe_config.json").is_file()
    assert (tmp_path / "expert0" / "adapter_config.json").is_file()
    assert scope["model"].num_experts == 6 and not scope["model"].training
