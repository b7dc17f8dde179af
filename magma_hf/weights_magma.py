"""MAGMA's weight names: GPT-J's <-> MAGMA's <-> PEFT's, which weights are MAGMA's own, and its weight files.

A flat sibling of `modeling_magma.py`, which imports it, so the Hub code export carries it (`trust_remote_code`
folders); it imports nothing of the package. Everything that maps, selects or names weights, names weight files or
checks that a state dict fits a model goes through here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch import nn
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

# Where each part sits in `MagmaForConditionalGeneration`'s state dict.
LANGUAGE_MODEL_PREFIX = "model.language_model."  # GPT-J's transformer
LM_HEAD_PREFIX = "lm_head."
VISION_TOWER_PREFIX = "model.vision_tower."  # open_clip's ModifiedResNet, its own names, no attention pooling
PROJECTOR_PREFIX = "model.multi_modal_projector."
IMAGE_PREFIX_MODULES = (VISION_TOWER_PREFIX, PROJECTOR_PREFIX)  # the image prefix: encoder and projection
ADAPTER_MARKER = ".magma_"  # the adapters' containers inside GPT-J's layers: `.mlp.magma_down.default.weight`

GPTJ_BASE_PREFIX = "transformer"  # GPTJForCausalLM.base_model_prefix
# PEFT's names on GPTJForCausalLM (`PeftModel` wraps it as `base_model.model`; the adapter name "default" dropped).
PEFT_PREFIX = f"base_model.model.{GPTJ_BASE_PREFIX}."
_ADAPTER_CONTAINER = re.compile(r"\.(magma_[a-z]+)(?=\.|$)")
PEFT_ADAPTER_NAME = "default"  # the one adapter's name inside each container (`magma_down.default.weight`)

# The full model's weight files, as `save_pretrained` names them (transformers' names): one file, or shards and
# their index.
MODEL_WEIGHTS_FILE = SAFE_WEIGHTS_NAME  # model.safetensors
MODEL_WEIGHTS_INDEX_FILE = SAFE_WEIGHTS_INDEX_NAME  # model.safetensors.index.json
# Every weight file of a saved model: the one file, the shards `save_pretrained` names `model-0000i-of-0000n`, the index
WEIGHT_FILE_NAME = re.compile(
    re.escape(MODEL_WEIGHTS_FILE).replace(r"\.safetensors", r"(-\d{5}-of-\d{5})?\.safetensors")
    + rf"|{re.escape(MODEL_WEIGHTS_INDEX_FILE)}"
)


def is_weights_name(name: str) -> bool:
    """`name` is a weight file of a saved model (`model.safetensors`, a shard of it, or its index)."""
    return WEIGHT_FILE_NAME.fullmatch(name) is not None
# MAGMA-only weight files (no GPT-J weight in them).
MAGMA_WEIGHTS_NAME = "magma_weights.safetensors"  # a training checkpoint's model weights
IMAGE_PREFIX_FILE = "image_prefix.safetensors"  # the adapter export's image encoder and projection
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"  # the adapter export's adapters, PEFT format
PEFT_CONFIG_FILE = "adapter_config.json"


def is_adapter_weight(name: str) -> bool:
    return ADAPTER_MARKER in name


def is_image_prefix_weight(name: str) -> bool:
    return name.startswith(IMAGE_PREFIX_MODULES)


def is_magma_weight(name: str) -> bool:
    """MAGMA's own weights (image encoder, projection, adapters): everything that is not GPT-J's."""
    return is_image_prefix_weight(name) or is_adapter_weight(name)


def is_gptj_weight(name: str) -> bool:
    """A weight of the frozen GPT-J: the language model without its adapters, and the LM head."""
    return name.startswith((LANGUAGE_MODEL_PREFIX, LM_HEAD_PREFIX)) and not is_adapter_weight(name)


def magma_state_dict(state_dict: dict) -> dict:
    """The MAGMA-specific entries of a full state dict: image encoder, projection and adapters (no GPT-J weight)."""
    return {name: tensor for name, tensor in state_dict.items() if is_magma_weight(name)}


def gptj_name(name: str) -> str:
    """This model's name of a GPT-J weight -> `GPTJForCausalLM`'s name.

    `model.language_model.h.0.mlp.base_layer.fc_in.weight` -> `transformer.h.0.mlp.fc_in.weight`.
    """
    name = name.replace(".base_layer.", ".")
    if name.startswith(LANGUAGE_MODEL_PREFIX):
        return GPTJ_BASE_PREFIX + "." + name.removeprefix(LANGUAGE_MODEL_PREFIX)
    return name


def vision_tower_name(open_clip_name: str) -> str:
    """open_clip's visual tower name -> this model's: `layer1.0.conv1.weight` -> `model.vision_tower.layer1...`."""
    return VISION_TOWER_PREFIX + open_clip_name


def peft_name_to_model_name(name: str) -> str:
    """PEFT's name on GPT-J -> this model's.

    `base_model.model.transformer.h.0.mlp.magma_down.weight` -> `model.language_model.h.0.mlp.magma_down.default.weight`
    """
    if not name.startswith(PEFT_PREFIX):
        raise ValueError(f"Unexpected adapter weight {name!r}: expected names starting with {PEFT_PREFIX!r}")
    return LANGUAGE_MODEL_PREFIX + _ADAPTER_CONTAINER.sub(rf".\1.{PEFT_ADAPTER_NAME}", name.removeprefix(PEFT_PREFIX))


def language_model_state_dict(state_dict: dict) -> dict:
    """The language model's entries of a full state dict, under the language model's own names (what PEFT reads)."""
    prefix = LANGUAGE_MODEL_PREFIX
    return {name.removeprefix(prefix): tensor for name, tensor in state_dict.items() if name.startswith(prefix)}


def peft_state_dict(language_model_adapter_state: dict) -> dict:
    """PEFT's adapter state of the language model (`h.0.mlp.magma_down.weight`) under `PeftModel`'s names on
    `GPTJForCausalLM` (`base_model.model.transformer.h.0...`)."""
    return {PEFT_PREFIX + key: tensor for key, tensor in language_model_adapter_state.items()}


def shape_of(tensor_or_shape: Any) -> tuple[int, ...]:
    return tuple(getattr(tensor_or_shape, "shape", tensor_or_shape))


def check_state_dict(
    expected: Mapping[str, Any], state_dict: Mapping[str, Any], source: str, *,
    required: Callable[[str], bool] = lambda name: True, allow_unexpected: bool = False,
    error: type[Exception] = ValueError, limit: int = 10,
) -> None:
    """Check that `state_dict` fits a model whose weights are `expected` (tensors, meta tensors or shapes, by name),
    else raise `error` naming up to `limit` weights of each kind of problem: the package's one fit check.

    Args:
        source: What `state_dict` is, the subject of the message ("The language model has no weight [...]").
        required: Which weights of `expected` must be there (by default all; the others are, e.g., new by intent).
        allow_unexpected: Ignore weights `expected` does not have (e.g. a whole GPT-J's, of which some are taken).
    """
    missing = [name for name in expected if name not in state_dict and required(name)]
    unexpected = [] if allow_unexpected else sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{name}: {shape_of(state_dict[name])} vs {shape_of(expected[name])}"  # its shape vs the model's
        for name in expected
        if name in state_dict and shape_of(state_dict[name]) != shape_of(expected[name])
    ]

    def more(listed: list[str]) -> str:
        return f" ({len(listed)} in all)" if len(listed) > limit else ""

    def names(listed: list[str]) -> str:
        return ", ".join(map(repr, listed[:limit])) + more(listed)

    problems = [
        *([f"has no weight {names(missing)}"] if missing else []),
        *([f"has weights the model does not have: {names(unexpected)}"] if unexpected else []),
        *([f"has a shape mismatch {mismatched[:limit]}{more(mismatched)}"] if mismatched else []),
    ]
    if problems:
        raise error(f"{source} {', and '.join(problems)}")


def gptj_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The GPT-J weights of a MAGMA model (language model without adapters, LM head), with their names there."""
    for name, param in model.named_parameters():
        if is_gptj_weight(name):
            yield name, param


def gptj_weights_by_name(
    model: nn.Module, gptj_state_dict: Mapping[str, Any], source: str = "The GPT-J state dict"
) -> dict[str, Any]:
    """A `GPTJForCausalLM` state dict (`transformer.*`, `lm_head.*`) under the names of MAGMA `model`.

    Every GPT-J weight of `model` must be there with the same shape, or a `ValueError` names what is not (works on a
    model built on the meta device: only names and shapes are read).
    """
    parameters = dict(gptj_named_parameters(model))
    expected = {gptj_name(name): param for name, param in parameters.items()}
    check_state_dict(expected, gptj_state_dict, source, allow_unexpected=True)
    return {name: gptj_state_dict[gptj_name(name)] for name in parameters}

