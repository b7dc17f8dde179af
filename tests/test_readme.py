"""The README's Python examples run as written, on a tiny model in place of the converted checkpoint."""

import re
from pathlib import Path

import torch
from helpers import random_image, tiny_config

from magma_hf import MagmaForConditionalGeneration

README = Path(__file__).parents[1] / "README.md"
MODEL_DIR_LINE = 'model_dir = "magma-v1"'


def python_blocks() -> list[str]:
    """The examples of this environment: those of vLLM's (`from vllm`, the server's client) run in tests/vllm."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return [block for block in blocks if not re.search(r"^from (vllm|openai) import", block, flags=re.M)]


def test_readme_examples_run(tmp_path, monkeypatch, tokenizer, processor):
    blocks = python_blocks()
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
