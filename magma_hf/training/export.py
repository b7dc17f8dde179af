"""MAGMA's own weights without GPT-J: what training changes, small enough to share beside a stock GPT-J.

An adapter export folder holds:

- `adapter_config.json` + `adapter_model.safetensors`: the adapters in PEFT format, for a stock `GPTJForCausalLM`
  (`PeftModel.from_pretrained(gptj, folder)` after `import magma_hf`);
- `image_prefix.safetensors`: the image encoder (parameters and BatchNorm statistics) and the image projection, under
  the names of [`MagmaForConditionalGeneration`]'s state dict (`model.vision_tower.*`, `model.multi_modal_projector.*`);
- `config.json` (the [`MagmaConfig`]) and the processor files.

[`load_adapter_export`] rebuilds the full model from that folder and a stock GPT-J (the Hub's `EleutherAI/gpt-j-6B`
or any `GPTJForCausalLM` with the same shapes):

```python
>>> from magma_hf.training.export import load_adapter_export
>>> model = load_adapter_export("magma_adapters", "EleutherAI/gpt-j-6B", dtype=torch.bfloat16)
```
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import GPTJForCausalLM, PreTrainedModel

from ..configuration_magma import MagmaConfig
from ..factory import empty_model, load_model_from_state_dict
from ..folders import FolderWriter
from ..modeling_magma import MagmaForConditionalGeneration
from ..weights_magma import (
    IMAGE_PREFIX_FILE,
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    is_image_prefix_weight,
    magma_state_dict,
    peft_name_to_model_name,
)

EXPORT_INFO_FILE = "magma_export.json"  # the export's manifest (folders.py's format) and its base language model
# How an export writes into its folder: built in `.{name}.exporting` beside it (one fixed name, which `magma-hf train`
# knows as its own); the user's README.md is kept; the export's own earlier files are replaced.
EXPORT_FOLDER = FolderWriter(
    manifest_name=EXPORT_INFO_FILE,
    written_by="magma_hf.training.export.save_adapter_export",
    note="The files an adapter export wrote here; a later export replaces only these, while unchanged.",
    infix=".exporting",
    lock_name="exporting.lock",
    error=FileExistsError,
    noun="adapter export",
    label="the export folder",
    overwrite_flag="",
    keeps=lambda path: path.name == "README.md",
    fixed_workspace=True,
)
EXPORT_README = """# MAGMA adapters, image encoder and projection

The weights MAGMA adds to GPT-J ({base}), without GPT-J itself. Rebuild the full model with
magma_hf:

```python
import torch
from magma_hf.training.export import load_adapter_export

model = load_adapter_export("path/to/this/folder", "{base}", dtype=torch.bfloat16)
```

- `adapter_model.safetensors`, `adapter_config.json`: the adapters, PEFT format (for `GPTJForCausalLM`;
  `import magma_hf` before `PeftModel.from_pretrained`).
- `image_prefix.safetensors`: the image encoder (CLIP ResNet without attention pooling) and the image projection.
- `config.json` and the processor files: the MAGMA config, tokenizer and image preprocessing.
"""


def save_adapter_export(
    model: MagmaForConditionalGeneration,
    export_dir: str | os.PathLike,
    processor=None,
    base_model_name_or_path: str | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model`'s adapters (PEFT format), image encoder and projection, config and processor to `export_dir`.

    Args:
        model: The trained model.
        export_dir: The folder to write (created).
        processor: Saved beside, so the export carries its tokenizer and image size.
        base_model_name_or_path: The stock GPT-J it goes with, recorded in the PEFT config and the config.
        state_dict: The model's full state dict when `model`'s own parameters are not (ZeRO-3 shards); by default
            `model.state_dict()`.
    """
    export_dir = Path(export_dir)
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    # Written whole in a hidden folder beside, then moved in (folders.FolderWriter): a kill leaves the previous export's
    # files complete, and files in `export_dir` that no export wrote (the user's) are never touched.
    EXPORT_FOLDER.recover(export_dir)  # what a killed export left
    with EXPORT_FOLDER.workspace(export_dir) as staging:
        if model.config.adapter_config:
            model.save_peft_adapter(staging, base_model_name_or_path=base_model_name_or_path, state_dict=state_dict)
        state_dict = model.state_dict() if state_dict is None else state_dict
        prefix = {
            name: tensor.detach().contiguous().cpu()
            for name, tensor in state_dict.items()
            if is_image_prefix_weight(name)
        }
        save_file(prefix, staging / IMAGE_PREFIX_FILE, metadata={"format": "pt"})
        model.config.save_pretrained(staging)
        if processor is not None:
            processor.save_pretrained(staging)
        card = EXPORT_README.format(base=base_model_name_or_path or "EleutherAI/gpt-j-6B")
        (staging / "README.md").write_text(card)  # installed unless the folder holds the user's
        # the manifest (the export's index, moved in last) lists the model's files first
        EXPORT_FOLDER.install(
            staging, export_dir, overwrite=True, first=_export_files(model), base_language_model=base_model_name_or_path
        )
    return export_dir


def export_staging_name(export_dir_name: str) -> str:
    """The hidden folder beside an export in which `save_adapter_export` writes it."""
    return EXPORT_FOLDER.workspace_name(Path(export_dir_name))


def _export_files(model) -> list[str]:
    files = [IMAGE_PREFIX_FILE, "config.json"]
    return ([PEFT_WEIGHTS_FILE, PEFT_CONFIG_FILE] if model.config.adapter_config else []) + files


def _gptj_state_dict(language_model, dtype) -> dict[str, torch.Tensor]:
    if isinstance(language_model, dict):
        return language_model
    if isinstance(language_model, PreTrainedModel):
        return language_model.state_dict()
    return GPTJForCausalLM.from_pretrained(language_model, dtype=dtype).state_dict()


def load_adapter_export(
    export_dir: str | os.PathLike,
    language_model: str | os.PathLike | PreTrainedModel | dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> MagmaForConditionalGeneration:
    """Rebuild the full MAGMA model from an adapter export and a stock GPT-J.

    Args:
        export_dir: A folder written by [`save_adapter_export`] (e.g. `<save>/adapter_export` after `magma-hf train`).
        language_model: The GPT-J: a Hub id or folder of a `GPTJForCausalLM`, a loaded one, or its state dict. By
            default the base model recorded in the export.
        dtype: The dtype to load GPT-J and build the model in.

    Every weight of the model must come from one of the two sources: a missing or surplus weight is an error.
    """
    export_dir = Path(export_dir)
    config = MagmaConfig.from_pretrained(export_dir)
    if language_model is None and (export_dir / EXPORT_INFO_FILE).is_file():
        language_model = json.loads((export_dir / EXPORT_INFO_FILE).read_text()).get("base_language_model")
    if language_model is None:
        raise ValueError(f"{export_dir} does not record its GPT-J: pass language_model= (e.g. EleutherAI/gpt-j-6B)")
    skeleton = empty_model(config)
    expected = skeleton.state_dict()

    state_dict = skeleton.gptj_weights_by_name(_gptj_state_dict(language_model, dtype), source="The language model")
    state_dict.update(load_file(export_dir / IMAGE_PREFIX_FILE))
    if config.adapter_config:
        adapters = load_file(export_dir / PEFT_WEIGHTS_FILE)
        state_dict.update({peft_name_to_model_name(name): tensor for name, tensor in adapters.items()})

    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{name}: {tuple(state_dict[name].shape)} != {tuple(expected[name].shape)}"
        for name in expected
        if name in state_dict and state_dict[name].shape != expected[name].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{export_dir} + the language model do not make a complete model: missing {missing[:10]}, "
            f"unexpected {unexpected[:10]}, shape mismatch {mismatched[:10]}"
        )
    if dtype is not None:
        state_dict = {n: t.to(dtype) if t.is_floating_point() else t for n, t in state_dict.items()}
    return load_model_from_state_dict(config, state_dict, dtype, new_by_intent=lambda name: False)


__all__ = ["load_adapter_export", "magma_state_dict", "save_adapter_export"]
