"""The README's Python examples run as written, on a tiny model in place of the converted checkpoint."""

from pathlib import Path

import torch

from magma_hf import MagmaForConditionalGeneration
from tests.doc_blocks import run_by
from tests.helpers import random_image, tiny_config

README = Path(__file__).parents[2] / "README.md"
MODEL_DIR_LINE = 'model_dir = "magma-v1"'


def test_readme_examples_run(tmp_path, monkeypatch, tokenizer, processor):
    """The blocks marked as run by this test, in order, in one namespace (vLLM's run in tests/vllm)."""
    blocks = [block.text for block in run_by(__file__, "test_readme_examples_run")]
    assert len(blocks) >= 5 and MODEL_DIR_LINE in blocks[0]
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny-magma"
    MagmaForConditionalGeneration(tiny_config(tokenizer)).save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    monkeypatch.chdir(tmp_path)
    random_image(0, size=(120, 90)).save("photo.jpg")
    namespace: dict = {}
    for block in blocks:
        exec(compile(block.replace(MODEL_DIR_LINE, f'model_dir = "{model_dir}"'), str(README), "exec"), namespace)
    assert (tmp_path / "magma-adapters" / "adapter_model.safetensors").exists()
    assert namespace["generated"].shape[0] == 2  # the batched example generated one row per prompt
