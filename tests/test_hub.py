"""Adapters on the Hub (dylora_moe.hub): pushed and loaded back by id, offline, with the Hub's client replaced by
a local stand-in (uploads land in a folder; downloads come from it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError

from dylora_moe import CheckpointError, DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from dylora_moe.cli import main
from dylora_moe.hub import looks_like_hub_id, resolve_checkpoint
from tests.tiny import make_base, make_tokenizer, randomize_experts


class FakeHub:
    """``HfApi`` and ``snapshot_download`` over a local folder: repo ``owner/name`` is ``root/owner/name``."""

    def __init__(self, root: Path) -> None:
        self.root, self.created, self.uploads = root, [], []

    def api(self, token=None):
        hub = self

        class Api:
            def create_repo(self, repo_id, repo_type, private, exist_ok):
                hub.created.append((repo_id, private))

            def upload_folder(self, folder_path, repo_id, repo_type, commit_message, revision):
                target = hub.root / repo_id
                shutil.copytree(folder_path, target, dirs_exist_ok=True)
                hub.uploads.append((repo_id, commit_message, sorted(p.name for p in target.iterdir())))
                return f"https://huggingface.co/{repo_id}/commit/0"

        return Api()

    def snapshot_download(self, repo_id, revision=None):
        folder = self.root / repo_id
        if not folder.is_dir():
            raise LocalEntryNotFoundError(  # what an offline machine gets
                "Cannot find the requested files in the disk cache and outgoing traffic has been disabled.")
        return str(folder)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", fake.api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    return fake


@pytest.fixture
def model():
    m = DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(num_experts=2, r=4, alpha=8, dropout=0.0),
                             mature=True)
    randomize_experts(m)
    return m.eval()


def test_push_to_hub_and_from_pretrained_by_id(hub, model, batch):
    ids, mask, _ = batch
    url = model.push_to_hub("me/tiny-adapter", private=True)
    assert url.endswith("/commit/0") and hub.created == [("me/tiny-adapter", True)]
    loaded = DyLoRAMoEForCausalLM.from_pretrained("me/tiny-adapter", base_model=make_base("llama"))
    want = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, want)
    with pytest.raises(CheckpointError, match=r"me/missing: not a local folder.*LocalEntryNotFoundError: Cannot find"):
        DyLoRAMoEForCausalLM.from_pretrained("me/missing", base_model=make_base("llama"))


def test_the_push_command_uploads_the_folder_with_its_card_and_commands_load_by_id(hub, model, tmp_path, capsys):
    folder = model.save_pretrained(tmp_path / "run" / "final")
    (folder / "README.md").write_text("# card\n")
    base = tmp_path / "base"
    make_base("llama").save_pretrained(base)
    make_tokenizer().save_pretrained(base)
    assert main(["push", str(tmp_path / "run"), "me/run", "--commit-message", "first"]) == 0
    assert "pushed" in capsys.readouterr().out
    [(repo, message, files)] = hub.uploads
    assert repo == "me/run" and message == "first" and "README.md" in files and "dylora_moe_config.json" in files
    assert main(["inspect", "me/run", "--base-model", str(base)]) == 0
    assert "expert 1: rank 4" in capsys.readouterr().out
    assert main(["push", str(tmp_path / "run"), "not an id"]) == 2
    assert "is not a Hub repository id" in capsys.readouterr().err
    assert main(["push", str(tmp_path), "me/x"]) == 2  # no adapter there
    assert "no DyLoRA-MoE adapter" in capsys.readouterr().err


def test_local_paths_are_never_taken_for_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert looks_like_hub_id("me/adapter") and not looks_like_hub_id("runs/typo")
    assert not looks_like_hub_id("/abs/path") and not looks_like_hub_id("a/b/c")
    assert resolve_checkpoint("runs/typo") == Path("runs/typo")  # left to the caller's "no such folder"


def test_push_needs_no_torch(tmp_path, model):
    folder = model.save_pretrained(tmp_path / "adapter")
    code = ("import sys, huggingface_hub\n"
            "class Api:\n"
            "    def __init__(self, token=None): pass\n"
            "    def create_repo(self, *a, **k): pass\n"
            "    def upload_folder(self, **k): return 'url'\n"
            "huggingface_hub.HfApi = Api\n"
            "from dylora_moe.cli import main\n"
            f"assert main(['push', {str(folder)!r}, 'me/x']) == 0\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"
