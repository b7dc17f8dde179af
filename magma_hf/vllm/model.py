"""MAGMA in vLLM's model API: GPT-J blocks on vLLM's layers with MAGMA's adapters, the CLIP ResNet trunk and the image
prefix as the multimodal encoder, and the multimodal processor built on `MagmaProcessor`.

The model follows vLLM's `gpt_j.py`. Its weights load from a MAGMA folder's safetensors files as they are: the module
tree mirrors `MagmaForConditionalGeneration`'s (the adapters are `adapters_magma.MagmaAdapterLayer` around each
block's `attn` / `mlp`, as peft places them), so only the prefixes (from `weights_magma`) and GPT-J's separate q/k/v
projections (stacked into vLLM's `qkv_proj`) are mapped.

What the transformers processor knows stays there: the number of image tokens per image, `<|image|>`, and the image
preprocessing come from `MagmaProcessor`; a prompt without `<|image|>` gets its images in front (MAGMA's layout), and a
prompt whose `<|image|>` count differs from its images is refused, naming both counts.
"""

# No `from __future__ import annotations`: vLLM's `support_torch_compile` reads the forward's annotations as types.

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from itertools import islice

import torch
from torch import nn
from transformers import BatchFeature
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.distributed import get_pp_group
from vllm.exceptions import VLLMValidationError
from vllm.model_executor.layers.layernorm import LayerNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.gpt_j import GPTJMLP, GPTJAttention
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    ProcessorInputs,
    PromptReplacement,
    PromptUpdate,
    TimingContext,
)
from vllm.sequence import IntermediateTensors

from ..adapters_magma import MagmaAdapterLayer
from ..configuration_magma import MagmaConfig, MagmaVisionConfig
from ..processing_magma import IMAGE_TOKEN, MagmaProcessor, check_processor_matches_model
from ..weights_magma import (
    LANGUAGE_MODEL_PREFIX,
    LM_HEAD_PREFIX,
    PEFT_ADAPTER_NAME,
    PROJECTOR_PREFIX,
    VISION_TOWER_PREFIX,
)

# ---------------------------------------------------------------------------------------------------------------------
# The image encoder: CLIP's ModifiedResNet trunk (open_clip's module names) without attention pooling, native torch.


class MagmaBottleneck(nn.Module):
    """open_clip's `Bottleneck`: 1x1, 3x3, (avgpool when strided), 1x1 convolutions with an anti-aliased shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False)),
                        ("1", nn.BatchNorm2d(planes * self.expansion)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + identity)


class MagmaVisionTower(nn.Module):
    """`[n, 3, s, s]` -> `[n, (s / 32) ** 2, width * 32]`: the three-convolution stem, four stages, the last feature
    map flattened row-major (every position an image token), as `modeling_magma.MagmaVisionModel`."""

    def __init__(self, config: MagmaVisionConfig):
        super().__init__()
        width = config.width
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = width
        for number, (blocks, stride) in enumerate(zip(config.layers, (1, 2, 2, 2))):
            planes = width * 2**number
            stage = [MagmaBottleneck(inplanes, planes, stride)]
            inplanes = planes * MagmaBottleneck.expansion
            stage += [MagmaBottleneck(inplanes, planes) for _ in range(1, blocks)]
            self.add_module(f"layer{number + 1}", nn.Sequential(*stage))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.to(self.conv1.weight.dtype)
        for conv, norm in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = torch.relu(norm(conv(x)))
        x = self.avgpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.flatten(2).transpose(1, 2)


class MagmaMultiModalProjector(nn.Module):
    """MAGMA's image prefix head, `ln(dropout(proj(features)))` (dropout is the identity at inference)."""

    def __init__(self, config: MagmaConfig):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        self.proj = nn.Linear(config.vision_config.hidden_size, hidden_size)
        self.ln = nn.LayerNorm(hidden_size) if config.use_image_embed_layernorm else nn.Identity()

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.ln(self.proj(image_features))


# ---------------------------------------------------------------------------------------------------------------------
# GPT-J with MAGMA's adapters, on vLLM's layers (vLLM's gpt_j.py).


class MagmaGPTJAttention(GPTJAttention):
    """vLLM's GPT-J attention taking `hidden_states` first, the calling convention of the module an adapter wraps."""

    def forward(self, hidden_states: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(position_ids=position_ids, hidden_states=hidden_states)


def with_adapter(module: nn.Module, config: MagmaConfig, location: str) -> nn.Module:
    """`module` inside MAGMA's adapter for `location` ("mlp" / "attention"), as peft wraps it in the transformers
    model (so the weight names agree), or `module` itself where the config puts no adapter."""
    settings = config.adapter_config.get(location)
    if not settings:
        return module
    return MagmaAdapterLayer(module, PEFT_ADAPTER_NAME, config.text_config.hidden_size, location, **settings)


def wrapped_prefix(prefix: str, config: MagmaConfig, location: str) -> str:
    """The module path of a block part that `with_adapter` may wrap (`h.0.attn` -> `h.0.attn.base_layer`)."""
    return f"{prefix}.base_layer" if config.adapter_config.get(location) else prefix


class MagmaGPTJBlock(nn.Module):
    """vLLM's GPT-J block with MAGMA's adapters around its attention and MLP: `x + attn(ln(x)) + mlp(ln(x))`."""

    def __init__(
        self,
        config: MagmaConfig,
        cache_config: CacheConfig | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ):
        super().__init__()
        text_config = config.text_config
        inner_dim = 4 * text_config.n_embd if text_config.n_inner is None else text_config.n_inner
        self.ln_1 = LayerNorm(text_config.n_embd, eps=text_config.layer_norm_epsilon)
        attn_prefix = wrapped_prefix(f"{prefix}.attn", config, "attention")
        mlp_prefix = wrapped_prefix(f"{prefix}.mlp", config, "mlp")
        self.attn = with_adapter(
            MagmaGPTJAttention(text_config, cache_config, quant_config, prefix=attn_prefix), config, "attention"
        )
        self.mlp = with_adapter(GPTJMLP(inner_dim, text_config, quant_config, prefix=mlp_prefix), config, "mlp")

    def forward(self, position_ids: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = self.ln_1(hidden_states)
        return self.attn(normed, position_ids) + self.mlp(normed) + hidden_states


@support_torch_compile
class MagmaGPTJModel(nn.Module):
    """GPT-J's transformer (embeddings, blocks, final LayerNorm), vLLM's `GPTJModel` with MAGMA's blocks."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: MagmaConfig = vllm_config.model_config.hf_config
        text_config = config.text_config
        self.config = text_config
        self.embed_dim = text_config.n_embd
        self.wte = VocabParallelEmbedding(text_config.vocab_size, self.embed_dim)
        self.start_layer, self.end_layer, self.h = make_layers(
            text_config.n_layer,
            lambda prefix: MagmaGPTJBlock(config, vllm_config.cache_config, vllm_config.quant_config, prefix=prefix),
            prefix=f"{prefix}.h",
        )
        self.ln_f = LayerNorm(self.embed_dim, eps=text_config.layer_norm_epsilon)
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states"], text_config.n_embd
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        else:
            hidden_states = intermediate_tensors["hidden_states"]
        for layer in islice(self.h, self.start_layer, self.end_layer):
            hidden_states = layer(position_ids, hidden_states)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states})
        return self.ln_f(hidden_states)


class MagmaGPTJForCausalLM(nn.Module):
    """The language model: `MagmaGPTJModel` and GPT-J's LM head (with bias, untied)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        text_config = vllm_config.model_config.hf_config.text_config
        self.transformer = MagmaGPTJModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "transformer"))
        self.lm_head = ParallelLMHead(
            text_config.vocab_size,
            text_config.n_embd,
            bias=True,
            quant_config=vllm_config.quant_config,
            prefix=maybe_prefix(prefix, "lm_head"),
        )
        self.logits_processor = LogitsProcessor(text_config.vocab_size)
        self.make_empty_intermediate_tensors = self.transformer.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return self.transformer(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states, self.lm_head.bias)


# ---------------------------------------------------------------------------------------------------------------------
# Multimodal processing, on MagmaProcessor.


class MagmaProcessingInfo(BaseProcessingInfo):
    _checked = False  # whether the folder's tokenizer and processor were checked against the config

    def get_hf_config(self) -> MagmaConfig:
        return self.ctx.get_hf_config(MagmaConfig)

    def get_hf_processor(self, **kwargs: object) -> MagmaProcessor:
        if not self._checked:
            # The processor's own check first: vLLM reports a processor that fails to load as "consider setting
            # trust_remote_code=True", without the reason.
            MagmaProcessor.require_image_token(self.get_tokenizer())
        processor = self.ctx.get_hf_processor(MagmaProcessor, **kwargs)
        if not self._checked:  # once: the folder's tokenizer and config do not change
            check_processor_matches_model(processor, self.get_hf_config(), where=self.model_id)
            self._checked = True
        return processor

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}  # any number of images per prompt, up to `limit_mm_per_prompt`

    def validate_num_items(self, modality: str, num_items: int) -> None:
        """vLLM's check against `limit_mm_per_prompt`, its message with the count that was given."""
        try:
            super().validate_num_items(modality, num_items)
        except VLLMValidationError as error:
            raise VLLMValidationError(
                f"The prompt has {num_items} {modality}s. {error.args[0]}", parameter=modality, value=num_items
            ) from error

    def get_num_image_tokens(self) -> int:
        return self.get_hf_processor().num_image_tokens

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.get_num_image_tokens()}  # every image has the same size after preprocessing


class MagmaDummyInputsBuilder(BaseDummyInputsBuilder[MagmaProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.get_hf_processor().image_token * mm_counts.get("image", 0)

    def get_dummy_mm_data(
        self, seq_len: int, mm_counts: Mapping[str, int], mm_options: MultiModalDummyOptions
    ) -> dict:
        crop = self.info.get_hf_processor().image_processor.crop_size
        images = self._get_dummy_images(
            width=crop["width"],
            height=crop["height"],
            num_images=mm_counts.get("image", 0),
            overrides=mm_options.get("image"),
        )
        return {"image": images}


class MagmaMultiModalProcessor(BaseMultiModalProcessor[MagmaProcessingInfo]):
    """Each `<|image|>` of the prompt becomes its image's run of image tokens (`MagmaProcessor.num_image_tokens`);
    the pixels come from `MagmaProcessor`."""

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {"pixel_values": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        image_token_id = processor.image_token_id
        return [
            PromptReplacement(
                modality="image",
                target=[image_token_id],
                replacement=[image_token_id] * processor.num_image_tokens,
            )
        ]

    def apply(self, inputs: ProcessorInputs, timing_ctx: TimingContext):
        return super().apply(self._images_in_place(inputs), timing_ctx)

    def _images_in_place(self, inputs: ProcessorInputs) -> ProcessorInputs:
        """MAGMA's layout: a prompt without `<|image|>` gets its images in front; one with `<|image|>` must have one
        per image (the rule of `MagmaProcessor`, here on token ids)."""
        n_images = inputs.mm_data_items.get_all_counts().get("image", 0)
        processor = self.info.get_hf_processor()
        placeholders = inputs.prompt.count(processor.image_token_id)
        if placeholders == n_images:
            return inputs
        if placeholders == 0:
            return replace(inputs, prompt=[processor.image_token_id] * n_images + list(inputs.prompt))
        raise ValueError(
            f"The prompt has {placeholders} {processor.image_token} placeholders and {n_images} images: each "
            f"{processor.image_token} stands for one image, in order (or leave them out to put the images in front)."
        )


# ---------------------------------------------------------------------------------------------------------------------
# The model.


@MULTIMODAL_REGISTRY.register_processor(
    MagmaMultiModalProcessor, info=MagmaProcessingInfo, dummy_inputs=MagmaDummyInputsBuilder
)
class MagmaForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsPP):
    """MAGMA: image embeddings (`ln(proj(resnet(pixels)))`) where the image tokens stand, read by GPT-J with
    adapters."""

    # The folder's names (`MagmaForConditionalGeneration` in transformers) -> this module tree's.
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            VISION_TOWER_PREFIX: "vision_tower.",
            PROJECTOR_PREFIX: "multi_modal_projector.",
            LANGUAGE_MODEL_PREFIX: "language_model.transformer.",
            LM_HEAD_PREFIX: "language_model.lm_head.",
        },
        orig_to_new_stacked={
            ".q_proj": (".qkv_proj", "q"),
            ".k_proj": (".qkv_proj", "k"),
            ".v_proj": (".qkv_proj", "v"),
        },
    )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_TOKEN
        raise ValueError(f"MAGMA reads images only, not {modality!r}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: MagmaConfig = vllm_config.model_config.hf_config
        self.config = config
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower = MagmaVisionTower(config.vision_config)
            self.multi_modal_projector = MagmaMultiModalProjector(config)
        with self._mark_language_model(vllm_config):
            self.language_model = MagmaGPTJForCausalLM(
                vllm_config=vllm_config, prefix=maybe_prefix(prefix, "language_model")
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """One `[num_image_tokens, hidden]` embedding per image, in prompt order."""
        pixel_values = kwargs.pop("pixel_values", None)
        if pixel_values is None:
            return []
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.stack(list(pixel_values))
        self._check_pixel_values(pixel_values)
        embeddings = self.multi_modal_projector(self.vision_tower(pixel_values))
        return list(embeddings.unbind(0))

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        size = self.config.vision_config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(
                f"pixel_values has shape {list(pixel_values.shape)}; this model takes [n_images, 3, {size}, {size}] "
                "(vision_config.image_size): the folder's processor preprocesses images to that size"
            )

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.transformer(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)


__all__ = ["MagmaForConditionalGeneration", "MagmaMultiModalProcessor", "MagmaProcessingInfo"]
