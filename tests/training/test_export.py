"""The adapter export keeps what the user put in its folder and replaces only its own files."""

import json

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
    with files_unchanged(export, may_change=[IMAGE_PREFIX_FILE, "adapter_model.safetensors"]):
        save_adapter_export(model, export, processor)  # the same command again: its own files replaced
    second = load_file(export / IMAGE_PREFIX_FILE)
    name = "model.multi_modal_projector.proj.weight"
    assert torch.equal(second[name], first[name] + 1.0)
    assert json.loads((export / EXPORT_INFO_FILE).read_text())["files"][0] == "adapter_model.safetensors"
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]  # no staging left behind


def test_export_writes_its_card_and_replaces_only_its_own(model, processor, tmp_path):
    export = tmp_path / "adapter_export"
    save_adapter_export(model, export, processor)
    card = (export / "README.md").read_text()
    assert card.startswith("# MAGMA adapters")
    save_adapter_export(model, export, processor, base_model_name_or_path="my/gptj")
    assert "my/gptj" in (export / "README.md").read_text()  # its own card is refreshed
