"""One factory: MAGMA from the original's settings and pretrained parts.

The original MAGMA (github.com/Aleph-Alpha/magma) describes a model by the keys of its training YAML
(`MultimodalConfig`): `encoder_name`, `adapter_config`, `freeze_img_encoder`, `image_embed_dropout_prob`,
`use_image_embed_layernorm`, `lm_name`, `tokenizer_name`. This module turns those into the [`MagmaConfig`], the
tokenizer (GPT-2's plus `<|image|>`), the processor and the model: new (GPT-J and open_clip's pretrained weights) or
empty (on the meta device, for the converter). The converter, training and the adapter export all build through here.

Not part of the Hub code export, so it may import the whole package.
"""

from __future__ import annotations

import logging as std_logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import open_clip
import torch
import yaml
from transformers import AutoTokenizer, GPTJForCausalLM, PreTrainedTokenizerBase
from transformers.utils import logging

from .configuration_magma import DEFAULT_TEXT_CONFIG, MagmaConfig, normalize_adapter_config
from .generation import magma_generation_config
from .hub_magma import PROCESSOR_FILES_NEEDED, missing_files
from .image_processing_magma import MagmaImageProcessor
from .modeling_magma import MagmaForConditionalGeneration
from .processing_magma import IMAGE_TOKEN, MagmaProcessor, add_magma_special_tokens
from .weights_magma import check_state_dict, gptj_weights_by_name, is_magma_weight, vision_tower_name

logger = logging.get_logger(__name__)


class MagmaSettingsError(ValueError):
    """Original MAGMA settings, or a pretrained part, that do not make a MAGMA model; the message names the key."""


DEFAULT_TOKENIZER = "gpt2"  # the original's: GPT-2's tokenizer plus <|image|> (GPT-J's own has 143 extra tokens)
# The original `MultimodalConfig`'s defaults (magma/config.py) of the keys that shape the model. Its encoder_name
# default, "clip", is CLIP ViT-B/32, which MAGMA here does not implement: a YAML without encoder_name is refused.
ORIGINAL_DEFAULTS: dict[str, Any] = {
    "encoder_name": "clip",
    "adapter_config": None,
    "freeze_img_encoder": True,
    "image_embed_dropout_prob": 0.0,
    "use_image_embed_layernorm": False,
}
MODEL_KEYS = tuple(ORIGINAL_DEFAULTS)
# MAGMA_v1's model keys (the released checkpoint; configuration/MAGMA_v1.yml, which a test keeps equal): the
# converter's default, also where the repository's configuration folder is not installed.
MAGMA_V1_SETTINGS: dict[str, Any] = {
    "encoder_name": "clip_resnet_large",
    "adapter_config": {"mlp": {"adapter_type": "normal", "downsample_factor": 4}},
    "freeze_img_encoder": False,
    "image_embed_dropout_prob": 0.1,
    "use_image_embed_layernorm": True,
}
# encoder_name (the original's names and open_clip's) -> open_clip's CLIP ResNet, whose shapes open_clip's
# model config gives. The original's own names: clip_resnet_large, clip_resnet, clip_RN50 (magma/image_encoders.py).
ENCODERS = {"clip_resnet_large": "RN50x16", "clip_resnet": "RN50x4", "clip_RN50": "RN50"}
ENCODERS.update({name: name for name in ("RN50x16", "RN50x4", "RN50", "RN101", "RN50x64")})
# The original's other encoders, named in the error.
UNSUPPORTED_ENCODERS = {"clip": "CLIP ViT-B/32", "ViT-B/32": "CLIP ViT-B/32", "nfresnet50": "timm's NF-ResNet50"}


# ---------------------------------------------------------------------------------------------------------------------
# Settings and config


def open_clip_model_name(encoder_name: str) -> str:
    """open_clip's name of the CLIP ResNet an original `encoder_name` means."""
    if encoder_name in ENCODERS:
        return ENCODERS[encoder_name]
    what = UNSUPPORTED_ENCODERS.get(encoder_name)
    default = " (the original's default when encoder_name is not set)" if encoder_name == "clip" else ""
    raise MagmaSettingsError(
        f"encoder_name {encoder_name!r}{default} is "
        + (f"{what}, which MAGMA here does not implement" if what else "not known")
        + f": MAGMA here uses CLIP's ResNet image encoders, one of {sorted(ENCODERS)} (MAGMA_v1: clip_resnet_large)"
    )


def encoder_vision_config(encoder_name: str) -> dict[str, Any]:
    """`MagmaVisionConfig` fields (`layers`, `width`, `image_size` at the native resolution) of an encoder, from
    open_clip's own model config."""
    vision = open_clip.get_model_config(open_clip_model_name(encoder_name))["vision_cfg"]
    return {"layers": list(vision["layers"]), "width": vision["width"], "image_size": vision["image_size"]}


def model_settings(original: dict[str, Any]) -> dict[str, Any]:
    """[`MagmaConfig`] keyword arguments plus `vision_config` from original MAGMA settings (YAML keys); keys left
    out, or `None`, take the original's defaults. Other keys (training settings) are ignored."""
    values = {key: original.get(key) for key in MODEL_KEYS}
    values = {key: ORIGINAL_DEFAULTS[key] if value is None else value for key, value in values.items()}
    try:
        adapter_config = normalize_adapter_config(values["adapter_config"])
    except ValueError as error:
        raise MagmaSettingsError(f"adapter_config: {error}") from None
    return {
        "adapter_config": adapter_config,
        "use_image_embed_layernorm": bool(values["use_image_embed_layernorm"]),
        "image_embed_dropout_prob": float(values["image_embed_dropout_prob"]),
        "freeze_image_encoder": bool(values["freeze_img_encoder"]),
        "vision_config": encoder_vision_config(values["encoder_name"]),
    }


def read_magma_settings(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """[`model_settings`] of an original MAGMA training YAML; without a path, MAGMA_v1's."""
    if path is None:
        return model_settings(MAGMA_V1_SETTINGS)
    try:
        with open(path, encoding="utf-8") as stream:
            original = yaml.safe_load(stream)
    except (OSError, yaml.YAMLError) as error:
        raise MagmaSettingsError(f"cannot read the MAGMA config {path}: {error}") from error
    if not isinstance(original, dict):
        raise MagmaSettingsError(f"the MAGMA config {path} is not a YAML mapping")
    try:
        return model_settings(original)
    except MagmaSettingsError as error:
        raise MagmaSettingsError(f"{path}: {error}") from None


def build_magma_config(
    settings: dict[str, Any], text_config: dict | None, vision_config: dict | None, tokenizer: PreTrainedTokenizerBase,
    language_model_config: dict | None = None, **kwargs: Any,
) -> MagmaConfig:
    """The model's config: `settings` from [`model_settings`]; GPT-J-6B's text config, or `language_model_config`
    (a GPT-J's `config.to_dict()`), with the special tokens of the tokenizer, then `text_config`'s fields; the
    encoder's vision config with `vision_config`'s fields; `<|image|>` from the tokenizer."""
    text = {**DEFAULT_TEXT_CONFIG, **(language_model_config or {}), "tie_word_embeddings": False}
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    text.update({"bos_token_id": bos, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id})
    text.update(text_config or {})
    vision = {**settings["vision_config"], **(vision_config or {})}
    options = {key: value for key, value in settings.items() if key != "vision_config"}
    try:
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        return MagmaConfig(text_config=text, vision_config=vision, image_token_id=image_token_id, **options, **kwargs)
    except (TypeError, ValueError) as error:
        raise MagmaSettingsError(f"the configs do not make a MAGMA model: {error}") from error


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer and processor


def load_tokenizer(
    source: str | os.PathLike | PreTrainedTokenizerBase = DEFAULT_TOKENIZER, model_max_length: int | None = None
) -> PreTrainedTokenizerBase:
    """GPT-2's tokenizer (by name or folder; a tokenizer object is taken as it is) made MAGMA's: `<|image|>` added as
    the special cls token when absent, as the original did, end-of-text as padding."""
    if isinstance(source, (str, os.PathLike)):
        missing = missing_files(source, PROCESSOR_FILES_NEEDED[:1]) if os.path.isdir(source) else []
        if missing:  # transformers would advise installing sentencepiece
            raise MagmaSettingsError(
                f"cannot load the tokenizer {str(source)!r}: the folder has no {missing[0]}; give a local folder "
                "holding GPT-2's tokenizer files"
            )
        try:
            source = AutoTokenizer.from_pretrained(source)
        except Exception as error:  # offline cache miss, missing folder, ...
            raise MagmaSettingsError(
                f"cannot load the tokenizer {str(source)!r} ({type(error).__name__}: {error}); give a local folder "
                "holding GPT-2's tokenizer files"
            ) from error
    tokenizer = add_magma_special_tokens(source)
    if model_max_length:
        tokenizer.model_max_length = model_max_length
    return tokenizer


def build_processor(config: MagmaConfig, tokenizer: PreTrainedTokenizerBase) -> MagmaProcessor:
    """The processor of a model: its image size, the tokenizer."""
    image_processor = MagmaImageProcessor(image_size=config.vision_config.image_size)
    return MagmaProcessor(image_processor=image_processor, tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------------------------------------
# Models


def empty_model(config: MagmaConfig, dtype: torch.dtype = torch.float32) -> MagmaForConditionalGeneration:
    """The model on the meta device: names, shapes and the Hub export, without memory."""
    with torch.device("meta"):
        model = MagmaForConditionalGeneration(config)
    model.generation_config = magma_generation_config(config)  # the converter writes it as generation_config.json
    return model.to(dtype)


def open_clip_visual_state_dict(open_clip_name: str, pretrained: str) -> dict[str, torch.Tensor]:
    """open_clip's `create_model(name, pretrained=tag_or_file).visual` weights, without attention pooling."""
    visual = open_clip.create_model(open_clip_name, pretrained=pretrained).visual
    return {k: v for k, v in visual.state_dict().items() if not k.startswith("attnpool.")}


LOADING_LOGGERS = ("modeling_utils", "distributed.tensor_parallel")


@contextmanager
def _transformers_load_warnings_off() -> Iterator[None]:
    """transformers' loading logs every weight that is not in the state dict (a hundred lines for a new model's
    adapters, projection and encoder, all new by intent); `check_state_dict` checks them instead.

    The tensor-parallel logger goes quiet too: with the loading logger's level set, transformers also verifies the
    TP plan (even without TP) and lists every weight no plan shards (norms, the image encoder) as "not sharded"."""
    quieted = [std_logging.getLogger(f"transformers.{name}") for name in LOADING_LOGGERS]
    levels = [each.level for each in quieted]
    for each in quieted:
        each.setLevel(std_logging.ERROR)
    try:
        yield
    finally:
        for each, level in zip(quieted, levels):
            each.setLevel(level)


def load_model_from_state_dict(
    config: MagmaConfig,
    state_dict: dict[str, torch.Tensor],
    dtype: str | torch.dtype | None = None,
    new_by_intent: Callable[[str], bool] = is_magma_weight,
) -> MagmaForConditionalGeneration:
    """The model of `config` holding `state_dict`, built on the meta device (no second copy of GPT-J, no random init
    of it). The weights `state_dict` lacks are initialised by `_init_weights`; each must be `new_by_intent` (by
    default MAGMA's own: a GPT-J weight initialised at random is an error)."""
    with _transformers_load_warnings_off():
        model = MagmaForConditionalGeneration.from_pretrained(None, config=config, state_dict=state_dict, dtype=dtype)
    check_state_dict(
        model.state_dict(), state_dict, "The state dict", required=lambda name: not new_by_intent(name),
        error=MagmaSettingsError,
    )
    model.generation_config = magma_generation_config(config)  # no generation_config.json to load it from
    return model


def new_model(
    config: MagmaConfig, lm_name: str | None = None, encoder_name: str | None = None, pretrained: str | None = None,
    dtype: str = "float32",
) -> MagmaForConditionalGeneration:
    """A new MAGMA to train: GPT-J's weights from `lm_name`, the image encoder's from open_clip (`encoder_name`'s
    ResNet, weights `pretrained`, a tag or file), random where not given; training policy applied (GPT-J frozen)."""
    open_clip_name = open_clip_model_name(encoder_name) if pretrained is not None else None
    if lm_name is None and pretrained is None:
        model = MagmaForConditionalGeneration(config)
        model.generation_config = magma_generation_config(config)  # saved with the model
        model.apply_training_policy()
        return model
    skeleton, state_dict = empty_model(config), {}  # the pretrained weights must fit it (names and shapes)
    if lm_name is not None:
        logger.info(f"Loading GPT-J weights from {lm_name}")
        gptj = GPTJForCausalLM.from_pretrained(lm_name, dtype=dtype).state_dict()
        state_dict = gptj_weights_by_name(skeleton, gptj, source=lm_name)
        del gptj
    if pretrained is not None:
        logger.info(f"Loading the image encoder from open_clip {open_clip_name} pretrained={pretrained}")
        visual = open_clip_visual_state_dict(open_clip_name, pretrained)
        state_dict.update({vision_tower_name(k): v for k, v in visual.items()})
    source = f"The pretrained state dict (open_clip {open_clip_name} pretrained={pretrained})"
    # the weights it lacks are new (initialised), by intent; `load_model_from_state_dict` says which may be
    check_state_dict(skeleton.state_dict(), state_dict, source, required=lambda name: False, error=MagmaSettingsError)
    del skeleton
    # without lm_name GPT-J is random by intent too
    new_by_intent = is_magma_weight if lm_name is not None else lambda name: True
    model = load_model_from_state_dict(config, state_dict, dtype, new_by_intent)
    n_new = sum(1 for name in model.state_dict() if name not in state_dict)
    logger.info(f"Loaded {len(state_dict)} pretrained tensors; initialised {n_new} new ones (adapters, projection)")
    model.apply_training_policy()
    return model


__all__ = [
    "DEFAULT_TOKENIZER",
    "MAGMA_V1_SETTINGS",
    "MagmaSettingsError",
    "build_magma_config",
    "build_processor",
    "empty_model",
    "load_tokenizer",
    "model_settings",
    "new_model",
    "read_magma_settings",
]
