"""MAGMA configuration: a GPT-J text config, a CLIP ModifiedResNet vision config and MAGMA's adapters."""

from __future__ import annotations

import copy

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig

try:
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # transformers < 5.24 (vLLM's): sub-configs are built in `MagmaConfig.__post_init__`
    SubConfigSpec = None

from .hub_magma import config_left_unchanged, magma_pipeline_is_registered

ADAPTER_LOCATIONS = ("mlp", "attention")
ADAPTER_TYPES = ("normal", "parallel", "scaled_parallel")
ADAPTER_KEYS = ("adapter_type", "downsample_factor", "add_layernorm")
# MAGMA_v1: bottleneck adapters after every MLP, hidden size reduced 4x, no LayerNorm.
DEFAULT_ADAPTER_CONFIG = {"mlp": {"adapter_type": "normal", "downsample_factor": 4, "add_layernorm": False}}
# GPT-J-6B as MAGMA used it: the GPT-2 vocabulary padded to 50400, eos doubling as padding.
DEFAULT_TEXT_CONFIG = {"tie_word_embeddings": False, "pad_token_id": 50256}


def check_adapter_locations(adapter_config: dict) -> None:
    """An adapter config in the original MAGMA schema names no location but `mlp` and `attention`."""
    unknown_locations = sorted(set(adapter_config) - set(ADAPTER_LOCATIONS))
    if unknown_locations:
        raise ValueError(f"adapter_config has unknown locations {unknown_locations}; expected {[*ADAPTER_LOCATIONS]}")


def normalize_adapter_config(adapter_config: dict | None) -> dict:
    """Validate an adapter config in the original MAGMA schema and fill in its defaults: the normal form that
    `MagmaConfig.adapter_config` holds (and `MagmaAdapterConfig` its locations).

    `{"mlp": {"adapter_type": ..., "downsample_factor": 4, "add_layernorm": False}, "attention": {...}}`,
    either location optional. `None` or `{}` means no adapters.
    """
    if not adapter_config:
        return {}
    check_adapter_locations(adapter_config)
    normalized = {}
    for location, settings in adapter_config.items():
        if not settings:
            continue
        unknown_keys = sorted(set(settings) - set(ADAPTER_KEYS))
        if unknown_keys:
            raise ValueError(
                f"adapter_config[{location!r}] has unknown keys {unknown_keys}; expected {list(ADAPTER_KEYS)}"
            )
        adapter_type = settings.get("adapter_type")
        if adapter_type not in ADAPTER_TYPES:
            raise ValueError(
                f"adapter_config[{location!r}]['adapter_type'] is {adapter_type!r}; "
                f"expected one of {list(ADAPTER_TYPES)}"
            )
        downsample_factor = settings.get("downsample_factor", 4)
        if not isinstance(downsample_factor, int) or isinstance(downsample_factor, bool) or downsample_factor < 1:
            raise ValueError(
                f"adapter_config[{location!r}]['downsample_factor'] must be a positive integer, "
                f"got {downsample_factor!r}"
            )
        normalized[location] = {
            "adapter_type": adapter_type,
            "downsample_factor": downsample_factor,
            "add_layernorm": bool(settings.get("add_layernorm", False)),
        }
    return normalized


@strict
class MagmaVisionConfig(PreTrainedConfig):
    r"""
    The image encoder: open_clip's `ModifiedResNet` trunk without attention pooling. The defaults are CLIP RN50x16.

    Args:
        layers (`list[int]`, defaults to `[6, 8, 18, 8]`): Bottleneck blocks in each of the four stages.
        width (`int`, defaults to 96): Channels of the stem; stage `i` has `width * 2**i * 4` output channels.
        image_size (`int`, defaults to 384): Input resolution, a multiple of 32.

    The encoder turns `[b, 3, image_size, image_size]` into `[b, (image_size // 32) ** 2, hidden_size]`, where
    `hidden_size` is `width * 32` (derived, not stored).
    """

    model_type = "magma_vision"
    base_config_key = "vision_config"

    layers: list[int] | tuple[int, ...] = (6, 8, 18, 8)
    width: int = 96
    image_size: int = 384

    def __post_init__(self, **kwargs):
        self.layers = list(self.layers)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        if len(self.layers) != 4 or any(n < 1 for n in self.layers):
            raise ValueError(f"vision_config.layers must be four positive block counts, got {self.layers}")
        if self.image_size % 32 != 0:
            raise ValueError(f"vision_config.image_size must be a multiple of 32, got {self.image_size}")

    @property
    def hidden_size(self) -> int:
        """Channels of the last stage: the size of each image feature vector the encoder outputs.

        Derived from `width` (never serialized), so every config.json, old or new, means the same encoder.
        """
        return self.width * 32

    @hidden_size.setter
    def hidden_size(self, value: int) -> None:
        # transformers sets common attributes by name; the feature size follows from `width` and cannot differ.
        if value != self.width * 32:
            raise ValueError(
                f"vision_config.hidden_size {value} does not match width {self.width}: the encoder outputs "
                f"width * 32 = {self.width * 32} features; change width (hidden_size / 32) instead"
            )

    @property
    def num_image_tokens(self) -> int:
        """Feature vectors per image: the final feature map is `image_size / 32` on each side."""
        return (self.image_size // 32) ** 2


@strict
class MagmaConfig(PreTrainedConfig):
    r"""
    Configuration of a MAGMA model ([`MagmaForConditionalGeneration`]). The defaults reproduce MAGMA_v1: GPT-J-6B,
    CLIP RN50x16 at 384 px (144 image tokens of 3072 features) and MLP adapters with downsample factor 4.

    Args:
        text_config (`dict` or `GPTJConfig`): The frozen language model.
        vision_config (`dict` or `MagmaVisionConfig`): The image encoder.
        adapter_config (`dict`): Adapters in the original schema, `{"mlp": {...}, "attention": {...}}`, where each
            location holds `adapter_type` (`"normal"`, `"parallel"` or `"scaled_parallel"`), `downsample_factor` and
            `add_layernorm`. Either location may be left out.
        image_token_id (`int`, defaults to 50257): The `<|image|>` placeholder whose embeddings are replaced.
        use_image_embed_layernorm (`bool`, defaults to `True`): LayerNorm after the image projection.
        image_embed_dropout_prob (`float`, defaults to 0.1): Dropout on the projected image embeddings.
        freeze_image_encoder (`bool`, defaults to `False`): Keep the image encoder's weights fixed in training.

    Example:

    ```python
    >>> from magma_hf import MagmaConfig
    >>> tiny = MagmaConfig(
    ...     text_config={"n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8, "vocab_size": 300},
    ...     vision_config={"layers": [1, 1, 1, 1], "width": 8, "image_size": 64},
    ...     image_token_id=257,
    ... )
    ```
    """

    model_type = "magma"
    if SubConfigSpec is not None:
        sub_configs_defaults = {
            "text_config": SubConfigSpec(config_class=AutoConfig, model_type="gptj", init_kwargs=DEFAULT_TEXT_CONFIG),
            "vision_config": SubConfigSpec(config_class=MagmaVisionConfig),
        }
    else:
        sub_configs = {"text_config": AutoConfig, "vision_config": MagmaVisionConfig}

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    adapter_config: dict | None = None
    image_token_id: int = 50257
    use_image_embed_layernorm: bool = True
    image_embed_dropout_prob: float | int = 0.1
    freeze_image_encoder: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        # A saved folder's `custom_pipelines` serves trust_remote_code without this package. Where `import magma_hf`
        # registered the pipeline, it is dropped: transformers would otherwise demand trust_remote_code for it.
        if magma_pipeline_is_registered():
            kwargs.pop("custom_pipelines", None)
            # Likewise its `auto_map` (`auto_map_left_unchanged`): the Auto classes find MAGMA by model type here. Where
            # this class came from a folder's code, AutoModel reads it from the live config to find the model's code.
            kwargs.pop("auto_map", None)
        if self.adapter_config is None:
            self.adapter_config = copy.deepcopy(DEFAULT_ADAPTER_CONFIG)
        self.adapter_config = normalize_adapter_config(self.adapter_config)
        if SubConfigSpec is None:
            self._build_sub_configs()
        super().__post_init__(**kwargs)

    def _build_sub_configs(self) -> None:
        """What transformers >= 5.24 does from `sub_configs_defaults`, for older versions (vLLM's environment): a dict
        is built as its `model_type` says (GPT-J by default), `None` gets the defaults."""
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if not isinstance(self.text_config, PreTrainedConfig):
            text_config = dict(DEFAULT_TEXT_CONFIG) if self.text_config is None else dict(self.text_config)
            self.text_config = CONFIG_MAPPING[text_config.pop("model_type", "gptj")](**text_config)
        if not isinstance(self.vision_config, PreTrainedConfig):
            self.vision_config = MagmaVisionConfig(**(self.vision_config or {}))

    def validate_architecture(self):
        vocab_size = self.text_config.vocab_size
        if not 0 <= self.image_token_id < vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} is outside the vocabulary of {vocab_size} tokens")

    @property
    def num_image_tokens(self) -> int:
        return self.vision_config.num_image_tokens

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> None:
        """transformers' saving, which records `auto_map` on the live config to write it (the code export): put back,
        so saving changes nothing (trainer checkpoints and the adapter export save the config alone)."""
        with config_left_unchanged(self):
            super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)


__all__ = ["MagmaConfig", "MagmaVisionConfig"]
