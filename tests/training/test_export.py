"""The adapter export keeps what the user put in its folder and replaces only its own files."""

import json

import pytest
import torch
from safetensors.torch import load_file

from magma_hf.training.export import EXPORT_INFO_FILE, IMAGE_PREFIX_FILE, save_adapter_export
from tests.helpers import files_unchanged


def test_export_twice_keeps_the_users_files(model, processor, tmp_path):
    export = tmp_path / "adapter_export"
    export.mkdir()
    (export / "README.md").write_text("# My adapters\n\nTrained on my data; keep this card.\n")
    (export / "notes.txt").write_text("learning rate sweep: 1e-4 was best\n")
    with files_unchanged(export):
        save_adapter_export(model, export, processor)
    first = load_file(export / IMAGE_PREFIX_FILE)
    with torch.no_grad():
        model.model.multi_modal_projector.proj.weight.add_(1.0)
    # the same command again: its own files replaced (and its manifest, which records them)
    with files_unchanged(export, may_change=[IMAGE_PREFIX_FILE, "adapter_model.safetensors", EXPORT_INFO_FILE]):
        save_adapter_export(model, export, processor)
    second = load_file(export / IMAGE_PREFIX_FILE)
    name = "model.multi_modal_projector.proj.weight"
    assert torch.equal(second[name], first[name] + 1.0)
    assert list(json.loads((export / EXPORT_INFO_FILE).read_text())["files"])[0] == "adapter_model.safetensors"
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]  # no staging left behind


def test_export_writes_its_card_and_replaces_only_its_own(model, processor, tmp_path):
    export = tmp_path / "adapter_export"
    save_adapter_export(model, export, processor)
    card = (export / "README.md").read_text()
    assert card.startswith("# MAGMA adapters")
    save_adapter_export(model, export, processor, base_model_name_or_path="my/gptj")
    assert "my/gptj" in (export / "README.md").read_text()  # its own card is refreshed


def test_export_keeps_an_edited_card_and_names_a_users_file_in_the_way(model, processor, tmp_path):
    """One ownership rule (the manifest's records): the export's own card, edited since, is the user's and kept; a file
    the export writes that no export wrote stops it before anything is written."""
    export = tmp_path / "adapter_export"
    save_adapter_export(model, export, processor)
    (export / "README.md").write_text((export / "README.md").read_text() + "\nMy notes on this run.\n")
    with files_unchanged(export / "README.md"):
        save_adapter_export(model, export, processor, base_model_name_or_path="my/gptj")
    assert "My notes" in (export / "README.md").read_text()
    assert json.loads((export / EXPORT_INFO_FILE).read_text())["base_language_model"] == "my/gptj"
    (export / "config.json").write_text("{}")  # the user's now: changed since the export wrote it
    with files_unchanged(tmp_path, no_new_files=True), pytest.raises(FileExistsError, match=r"config\.json"):
        save_adapter_export(model, export, processor)
