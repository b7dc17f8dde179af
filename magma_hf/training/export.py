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
from peft import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import GPTJForCausalLM, PreTrainedModel

from ..configuration_magma import MagmaConfig
from ..factory import empty_model, load_model_from_state_dict
from ..folders import FolderWriter
from ..modeling_magma import MagmaForConditionalGeneration, adapter_peft_config
from ..weights_magma import (
    IMAGE_PREFIX_FILE,
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    check_state_dict,
    gptj_weights_by_name,
    is_image_prefix_weight,
    language_model_state_dict,
    magma_state_dict,
    peft_name_to_model_name,
    peft_state_dict,
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
            save_peft_adapter(model, staging, base_model_name_or_path=base_model_name_or_path, state_dict=state_dict)
        state_dict = model.state_dict() if state_dict is None else state_dict
        prefix = {name: t.detach().contiguous().cpu() for name, t in state_dict.items() if is_image_prefix_weight(name)}
        save_file(prefix, staging / IMAGE_PREFIX_FILE, metadata={"format": "pt"})
        model.config.save_pretrained(staging)
        if processor is not None:
            processor.save_pretrained(staging)
        card = EXPORT_README.format(base=base_model_name_or_path or "EleutherAI/gpt-j-6B")
        (staging / "README.md").write_text(card)  # installed unless the folder holds the user's
        # the manifest (the export's index, moved in last) lists the model's files first
        peft_files = [PEFT_WEIGHTS_FILE, PEFT_CONFIG_FILE] if model.config.adapter_config else []
        first = [*peft_files, IMAGE_PREFIX_FILE, "config.json"]
        EXPORT_FOLDER.install(staging, export_dir, True, first, base_language_model=base_model_name_or_path)
    return export_dir


def export_staging_name(export_dir_name: str) -> str:
    """The hidden folder beside an export in which `save_adapter_export` writes it."""
    return EXPORT_FOLDER.workspace_name(Path(export_dir_name))


def _gptj_state_dict(language_model, dtype) -> dict[str, torch.Tensor]:
    if isinstance(language_model, dict):
        return language_model
    if isinstance(language_model, PreTrainedModel):
        return language_model.state_dict()
    return GPTJForCausalLM.from_pretrained(language_model, dtype=dtype).state_dict()


def recorded_base_language_model(export_dir: str | os.PathLike) -> str | None:
    """The stock GPT-J an adapter export in `export_dir` was saved for (its manifest records it); `None` when the
    folder is not an export or records none."""
    info = Path(export_dir) / EXPORT_INFO_FILE
    return json.loads(info.read_text()).get("base_language_model") if info.is_file() else None


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
    if language_model is None:
        language_model = recorded_base_language_model(export_dir)
    if language_model is None:
        raise ValueError(f"{export_dir} does not record its GPT-J: pass language_model= (e.g. EleutherAI/gpt-j-6B)")
    skeleton = empty_model(config)

    state_dict = gptj_weights_by_name(skeleton, _gptj_state_dict(language_model, dtype), source="The language model")
    state_dict.update(load_file(export_dir / IMAGE_PREFIX_FILE))
    if config.adapter_config:
        adapters = load_file(export_dir / PEFT_WEIGHTS_FILE)
        state_dict.update({peft_name_to_model_name(name): tensor for name, tensor in adapters.items()})
    check_state_dict(skeleton.state_dict(), state_dict, f"{export_dir} + the language model")
    if dtype is not None:
        state_dict = {n: t.to(dtype) if t.is_floating_point() else t for n, t in state_dict.items()}
    return load_model_from_state_dict(config, state_dict, dtype, new_by_intent=lambda name: False)


def save_peft_adapter(
    model: MagmaForConditionalGeneration,
    save_directory: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Export `model`'s adapters alone in PEFT format, for `PeftModel.from_pretrained(GPTJForCausalLM, ...)`.

    Writes `adapter_config.json` and `adapter_model.safetensors` (keys as peft names them on a
    `GPTJForCausalLM`); on a stock GPT-J with the same weights, text-only logits equal the model's.

    Args:
        state_dict: The model's full state dict, when its own parameters do not hold the values (e.g. gathered
            from DeepSpeed ZeRO-3 shards); by default the model's parameters.
    """
    peft_config = adapter_peft_config(model.config)
    if peft_config is None:
        raise ValueError("This MAGMA model has no adapters (config.adapter_config is empty): nothing to export")
    peft_config.task_type = "CAUSAL_LM"
    peft_config.base_model_name_or_path = base_model_name_or_path
    if state_dict is not None:  # peft selects from the language model's part, under its own names
        state_dict = language_model_state_dict(state_dict)
    adapter_state = get_peft_model_state_dict(model.language_model, state_dict=state_dict, adapter_name="default")
    # The language model here is GPTJForCausalLM's `transformer`; PeftModel's keys start at the causal LM.
    adapter_state = peft_state_dict({key: t.detach().contiguous().cpu() for key, t in adapter_state.items()})
    Path(save_directory).mkdir(parents=True, exist_ok=True)
    save_file(adapter_state, Path(save_directory) / PEFT_WEIGHTS_FILE, metadata={"format": "pt"})
    peft_config.save_pretrained(save_directory)


__all__ = ["load_adapter_export", "magma_state_dict", "save_adapter_export", "save_peft_adapter"]
