"""MAGMA: a frozen GPT-J reading CLIP ResNet image features through a trained projection and bottleneck adapters."""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from open_clip.modified_resnet import Bottleneck, ModifiedResNet
from peft import inject_adapter_in_model
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard
from transformers.modeling_outputs import (
    BaseModelOutputWithNoAttention,
    BaseModelOutputWithPooling,
    MultimodalBaseModelOutputWithPast,
    MultimodalCausalLMOutputWithPast,
)
from transformers.modeling_utils import slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, torch_compilable_check
from transformers.utils.deprecation import deprecate_kwarg

from .adapters_magma import MagmaAdapterConfig, MagmaAdapterLayer
from .configuration_magma import MagmaConfig, MagmaVisionConfig
from .hub_magma import model_folder_checked, saving_as_hub_repo
from .pipeline_magma import MagmaImageToTextPipeline  # noqa: F401  (imported so the Hub code export carries it)
from .weights_magma import gptj_named_parameters, is_adapter_weight


def keeping_statistics_on_replay(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`module` as the function gradient checkpointing runs twice: in the forward pass, and again in the backward
    pass to recompute its activations. In training mode BatchNorm normalises with the batch's statistics and updates
    its running statistics: the replay runs the same operations with momentum 0 (a running statistic updated to
    itself) and puts its batch count back, so that checkpointing changes no buffer."""
    runs = 0

    def run(hidden_states: torch.Tensor) -> torch.Tensor:
        nonlocal runs
        runs += 1
        if runs == 1:
            return module(hidden_states)
        norms = [norm for norm in module.modules() if isinstance(norm, nn.modules.batchnorm._BatchNorm)]
        before = [(norm.momentum, norm.num_batches_tracked.clone()) for norm in norms]
        for norm in norms:
            norm.momentum = 0.0
        try:
            return module(hidden_states)
        finally:  # also where torch stops the replay early, by raising, once it has what the backward pass needs
            for norm, (momentum, batches) in zip(norms, before):
                norm.momentum = momentum
                norm.num_batches_tracked.copy_(batches)

    return run


class MagmaVisionPreTrainedModel(PreTrainedModel):
    config: MagmaVisionConfig
    config_class = MagmaVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["Bottleneck"]
    _can_compile_fullgraph = True
    # No attention layer: any attention implementation the composite model asks for leaves the encoder as it is.
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, Bottleneck):
            init.zeros_(module.bn3.weight)  # as open_clip: each residual block starts as the identity
        else:
            super()._init_weights(module)


class MagmaVisionModel(MagmaVisionPreTrainedModel):
    """CLIP's `ModifiedResNet` trunk (open_clip's implementation) without its attention pooling.

    The trunk's modules sit directly on this model under open_clip's and OpenAI's names (`conv1`, `bn1`, ...,
    `layer4.*`), so CLIP weights, converted checkpoints and saved folders load as they are. Output: the last feature
    map, flattened row-major into a sequence. With gradient checkpointing on, each residual block (`Bottleneck`) is
    recomputed in the backward pass, as transformers' encoders recompute their layers (the stem, like their
    embeddings, is not).
    """

    def __init__(self, config: MagmaVisionConfig):
        super().__init__(config)
        trunk = ModifiedResNet(
            config.layers, config.hidden_size, max(1, config.hidden_size // 64), config.image_size, config.width
        )
        for name, module in trunk.named_children():
            if name != "attnpool":  # MAGMA replaced CLIP's attention pooling by a reshape: every position is a token
                self.add_module(name, module)
        self.gradient_checkpointing = False
        self.post_init()

    def stem(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return ModifiedResNet.stem(self, pixel_values)  # open_clip's stem, on the same modules

    @can_return_tuple
    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithNoAttention:
        """`[b, 3, s, s]` -> `last_hidden_state` `[b, (s / 32) ** 2, width * 32]`; with `output_hidden_states`,
        `hidden_states` holds the feature maps `[b, c, h, w]` of the stem and of each of the four stages."""
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        x = self.stem(pixel_values.to(self.conv1.weight.dtype))
        stages = [x]
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            if checkpointing:
                for block in stage:
                    x = self._gradient_checkpointing_func(keeping_statistics_on_replay(block), x)
            else:
                x = stage(x)
            stages.append(x)
        return BaseModelOutputWithNoAttention(
            last_hidden_state=x.flatten(2).transpose(1, 2),  # row-major: every position is an image token
            hidden_states=tuple(stages) if output_hidden_states else None,
        )


MagmaImageEncoder = MagmaVisionModel  # its name before it became a PreTrainedModel


class MagmaMultiModalProjector(nn.Module):
    """MAGMA's image prefix head: `ln(dropout(proj(features)))`, `[b, n, vision_hidden]` -> `[b, n, text_hidden]`."""

    def __init__(self, config: MagmaConfig):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        self.proj = nn.Linear(config.vision_config.hidden_size, hidden_size)
        self.dropout = nn.Dropout(config.image_embed_dropout_prob)
        self.ln = nn.LayerNorm(hidden_size) if config.use_image_embed_layernorm else nn.Identity()

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.ln(self.dropout(self.proj(image_features)))


def tp_plan_with_adapters(language_model: PreTrainedModel) -> dict[str, str]:
    """GPT-J's tensor-parallel plan under the names its layers have once peft wrapped the adapter targets
    (`h.*.attn.q_proj` -> `h.*.attn.base_layer.q_proj`), with every adapter weight replicated on each rank."""
    module_names = {replace_layer_number_by_wildcard(name) for name, _ in language_model.named_modules()}
    plan = {}
    for pattern, style in language_model.config.base_model_tp_plan.items():
        parent, _, leaf = pattern.rpartition(".")
        wrapped = f"{parent}.base_layer.{leaf}"
        plan[wrapped if pattern not in module_names and wrapped in module_names else pattern] = style
    for name, _ in language_model.named_parameters():
        if is_adapter_weight(name):
            plan[replace_layer_number_by_wildcard(name.rsplit(".", 1)[0])] = "replicate"
    return plan


def adapter_peft_config(config: MagmaConfig) -> MagmaAdapterConfig | None:
    """The PEFT config of the adapters a MAGMA config asks for (`None` without adapters)."""
    if not config.adapter_config:
        return None
    return MagmaAdapterConfig.from_magma_adapter_config(config.adapter_config)


# `past_key_values`, the pre-5 name, renamed as transformers' own models do; given beside `cache=` (even `None`) it is
# an error, not dropped with a warning.
cache_renamed = deprecate_kwarg("past_key_values", "5.40.0", new_name="cache", raise_if_both_names=True)


class MagmaPreTrainedModel(PreTrainedModel):
    config: MagmaConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["GPTJBlock"]  # the vision model adds its own ("Bottleneck")
    _can_compile_fullgraph = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' loading; a local folder's files are checked first, and broken weight files named
        (`hub_magma.model_folder_checked`)."""
        has_config = bool(args) or kwargs.get("config") is not None
        with model_folder_checked(pretrained_model_name_or_path, kwargs.get("subfolder"), has_config):
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        # The image encoder's modules are initialised by MagmaVisionPreTrainedModel._init_weights (transformers'
        # composite-model dispatch gives each submodel's modules to that submodel's init).
        if isinstance(module, MagmaAdapterLayer):
            for adapter_name in module.magma_down:  # the original MAGMA init; skips weights loaded from a checkpoint
                module.reset_adapter_parameters(adapter_name)
        else:
            super()._init_weights(module)

    def initialize_weights(self) -> None:
        # The adapters live inside GPT-J, whose `_init_weights` transformers' dispatch would give them (and GPT-J's
        # init to their Linear layers): initialise each adapter layer through this model's `_initialize_weights`
        # first, and mark its adapter modules done so that the dispatch below leaves them alone.
        for module in self.modules():
            if isinstance(module, MagmaAdapterLayer):
                # is_custom_code=False: the adapter init checks each tensor's "loaded" flag itself, so the Hub
                # code export must not take the layer (which has no direct parameters) as already initialised.
                self._initialize_weights(module, is_custom_code=False)
                for container in MagmaAdapterLayer.adapter_layer_names:
                    for submodule in getattr(module, container).modules():
                        submodule._is_hf_initialized = True
        super().initialize_weights()


class MagmaModel(MagmaPreTrainedModel):
    """Image encoder, image prefix projection and GPT-J (with MAGMA adapters), without the LM head."""

    def __init__(self, config: MagmaConfig):
        super().__init__(config)
        self.vision_tower = MagmaVisionModel(config.vision_config)
        self.multi_modal_projector = MagmaMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        if (peft_config := adapter_peft_config(config)) is not None:
            inject_adapter_in_model(peft_config, self.language_model)
            # peft freezes all but the adapters: a training policy, applied explicitly (`apply_training_policy`)
            self.language_model.requires_grad_(True)
            self.language_model._tp_plan = tp_plan_with_adapters(self.language_model)
        self.post_init()  # collects the language model's plan under `language_model.*`

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling | tuple:
        """Encode images.

        `output_hidden_states` comes through `kwargs`, as LLaVA takes it: `generate` gives this method every argument
        its signature names and drops those from the decoding steps, which would then return no hidden states.

        Args:
            pixel_values: `[n_images, 3, image_size, image_size]`.
            output_hidden_states: Also return the encoder's stage outputs; defaults to `config.output_hidden_states`.
            return_dict: `False` gives the output as a tuple (defaults to `config.return_dict`).

        Returns:
            `BaseModelOutputWithPooling` whose `last_hidden_state` holds the encoder features
            `[n_images, n_tokens, vision_config.hidden_size]`, `pooler_output` the image embeddings the language model
            reads, `[n_images, n_tokens, text hidden_size]`, and with `output_hidden_states` `hidden_states`: the
            feature maps `[n_images, c, h, w]` of the stem and of each of the four stages (the last one is
            `last_hidden_state` before flattening), as ResNets in transformers give them.
        """
        output_hidden_states = kwargs.get("output_hidden_states")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        self.check_pixel_values(pixel_values)
        encoded = self.vision_tower(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        return BaseModelOutputWithPooling(
            last_hidden_state=encoded.last_hidden_state,
            pooler_output=self.multi_modal_projector(encoded.last_hidden_state),
            hidden_states=encoded.hidden_states,
        )

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """`pixel_values` must be `[n_images, 3, image_size, image_size]` floats, checked from the shape and dtype alone
        (no device sync): at another size the encoder still runs, and its token count may even fit the text."""
        size = self.config.vision_config.image_size
        expected = f"[n_images, 3, {size}, {size}] (vision_config.image_size {size})"
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[2:]) != (size, size):
            raise ValueError(
                f"pixel_values has shape {list(pixel_values.shape)}; this model takes {expected}. Preprocess the "
                f"images with the model's processor, or MagmaImageProcessor(image_size={size})."
            )
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values are {pixel_values.dtype}; this model takes floating-point pixels normalised with "
                f"CLIP's mean and std, as MagmaImageProcessor(image_size={size}) gives them"
            )

    def check_sequence_length(self, new_tokens: int, cache: Cache | None, pixel_values: torch.Tensor | None) -> None:
        """Cached plus new tokens must fit GPT-J's `n_positions`; else GPT-J fails with an IndexError deep inside (a
        device-side assert on CUDA). Read from shapes and the cache's length: no device sync with a dynamic cache;
        a compiler hint, not a graph break, under `torch.compile`."""
        cached = cache.get_seq_length() if cache is not None else 0  # a tensor for a static cache
        limit = self.config.text_config.n_positions
        torch_compilable_check(
            cached + new_tokens <= limit,
            lambda: self.sequence_too_long_message(int(cached), new_tokens, pixel_values),
        )

    def sequence_too_long_message(self, cached: int, new_tokens: int, pixel_values: torch.Tensor | None) -> str:
        limit = self.config.text_config.n_positions
        parts = [f"{cached} cached + {new_tokens} new"] if cached else []
        if pixel_values is not None and pixel_values.ndim == 4:
            parts.append(f"{pixel_values.shape[0]} image(s) of {self.config.num_image_tokens} tokens each")
        detail = f" ({'; '.join(parts)})" if parts else ""
        return (
            f"The sequence is {cached + new_tokens} tokens long{detail}, more than the {limit} positions of the "
            "language model (text_config.n_positions): shorten the text, pass fewer images, or lower max_new_tokens"
        )

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """Boolean mask `[b, seq, 1]` of the image-token positions; their count must match the image features."""
        if input_ids is None:
            image_token_embedding = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
            )
            mask = (inputs_embeds == image_token_embedding).all(-1)
        else:
            mask = input_ids == self.config.image_token_id
        n_image_tokens = mask.sum()  # a tensor: compared on the device, read on the host only to report a mismatch
        n_feature_tokens = image_features.shape[0] * image_features.shape[1]
        torch_compilable_check(
            n_image_tokens == n_feature_tokens,
            lambda: self.placeholder_mismatch_message(int(n_image_tokens), image_features),
        )
        return mask.unsqueeze(-1)

    def placeholder_mismatch_message(self, n_image_tokens: int, image_features: torch.Tensor) -> str:
        n_feature_tokens = image_features.shape[0] * image_features.shape[1]
        hint = ""
        if n_image_tokens == 0:
            hint = (
                f". With no image token at all, the tokenizer probably maps <|image|> to another id than the "
                f"model's image_token_id {self.config.image_token_id}: use the processor saved with the model"
            )
        return (
            f"Image features and image tokens do not match: the input has {n_image_tokens} image tokens "
            f"(id {self.config.image_token_id}) but {image_features.shape[0]} images give {n_feature_tokens} "
            f"({image_features.shape[1]} per image){hint}"
        )

    @can_return_tuple
    @cache_renamed
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MultimodalBaseModelOutputWithPast:
        """
        Args:
            input_ids: `[b, seq]`, with `config.image_token_id` wherever an image embedding goes (one run of
                `num_image_tokens` per image, in order).
            pixel_values: `[n_images, 3, s, s]`, the images of the whole batch in the order they appear.
            mm_encoder_outputs: `{"image": get_image_features(...)}`, to reuse images encoded before.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if pixel_values is not None and mm_encoder_outputs is not None and mm_encoder_outputs.get("image") is not None:
            raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs at the same time")
        new_tokens = (input_ids if inputs_embeds is None else inputs_embeds).shape[1]
        self.check_sequence_length(new_tokens, cache, pixel_values)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        image_outputs = (mm_encoder_outputs or {}).get("image")
        if image_outputs is None and pixel_values is not None:
            image_outputs = self.get_image_features(pixel_values, return_dict=True)
        if image_outputs is not None:
            image_embeddings = image_outputs.pooler_output
            if isinstance(image_embeddings, (list, tuple)):
                image_embeddings = torch.stack(list(image_embeddings))
            image_embeddings = image_embeddings.to(inputs_embeds.device, inputs_embeds.dtype)
            mask = self.get_placeholder_mask(input_ids, inputs_embeds, image_embeddings)
            inputs_embeds = inputs_embeds.masked_scatter(mask, image_embeddings)

        # return_dict: read as an output below, whatever text_config.return_dict says
        outputs = self.language_model(
            attention_mask=attention_mask, position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds,
            return_dict=True, **kwargs,
        )
        return MultimodalBaseModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state, cache=outputs.cache, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions, image_outputs=image_outputs,
        )


@dataclass
class MagmaCausalLMOutputWithPast(MultimodalCausalLMOutputWithPast):
    """Loss, logits `[b, seq, vocab]`, cache and the image encoder's outputs."""


class MagmaForConditionalGeneration(MagmaPreTrainedModel, GenerationMixin):
    """MAGMA with GPT-J's LM head: captions, answers and any text conditioned on interleaved images.

    As any transformers model, it is built and loaded with every parameter trainable. MAGMA's training policy (GPT-J
    and its LM head frozen; adapters, the image projection and, unless `config.freeze_image_encoder`, the image
    encoder trained) is applied explicitly by [`~MagmaForConditionalGeneration.apply_training_policy`], which
    `MagmaTrainer` and the training run's model builder call.
    """

    _tied_weights_keys = {}
    _tp_plan = {"lm_head": "colwise_gather_output"}  # GPT-J's

    def __init__(self, config: MagmaConfig):
        super().__init__(config)
        self.model = MagmaModel(config)
        # GPT-J's head has a bias, and in MAGMA it is not tied to the (shorter, resized) input embedding.
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=True)
        self.post_init()

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, the live config left as it was; with the code export on (`import
        magma_hf` turns it on) the folder is a Hub repo (`hub_magma.saving_as_hub_repo`)."""
        exporting_code = self._auto_class is not None
        with saving_as_hub_repo(self.config, save_directory, exporting_code, kwargs.get("is_main_process", True)):
            super().save_pretrained(save_directory, *args, **kwargs)

    def gptj_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The GPT-J weights of this model (language model without adapters, LM head), with their names here."""
        return gptj_named_parameters(self)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    @property
    def language_model(self) -> PreTrainedModel:
        return self.model.language_model

    @property
    def vision_tower(self) -> MagmaVisionModel:
        return self.model.vision_tower

    @property
    def multi_modal_projector(self) -> MagmaMultiModalProjector:
        return self.model.multi_modal_projector

    def apply_training_policy(self, train_image_encoder: bool | None = None) -> None:
        """Freeze GPT-J (embeddings, blocks, head); train adapters, the projection and, unless frozen, the encoder.

        A method of the model (not of the trainer) because it is the model's structure that says which weights are
        MAGMA's; `MagmaTrainer` calls it on construction, and so does the training run's model builder.

        Args:
            train_image_encoder: Overrides `not config.freeze_image_encoder` when given.
        """
        if train_image_encoder is None:
            train_image_encoder = not self.config.freeze_image_encoder
        self.requires_grad_(False)
        for module in self.language_model.modules():
            if isinstance(module, MagmaAdapterLayer):
                for container in MagmaAdapterLayer.adapter_layer_names:
                    getattr(module, container).requires_grad_(True)
        self.multi_modal_projector.requires_grad_(True)
        self.vision_tower.requires_grad_(train_image_encoder)

    def train(self, mode: bool = True):
        super().train(mode)
        # A frozen encoder stays frozen: its BatchNorm statistics would otherwise still move in training mode.
        if mode and not any(param.requires_grad for param in self.vision_tower.parameters()):
            self.vision_tower.eval()
        return self

    def get_image_features(
        self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling | tuple:
        """See [`MagmaModel.get_image_features`]: embeddings `[n_images, n_tokens, hidden]` in `pooler_output`."""
        return self.model.get_image_features(pixel_values, **kwargs)

    @can_return_tuple
    @cache_renamed
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MagmaCausalLMOutputWithPast:
        """
        Args:
            input_ids: `[b, seq]` token ids with image-token runs where images go (see [`MagmaProcessor`]).
            pixel_values: `[n_images, 3, s, s]`.
            labels: `[b, seq]`; -100 is ignored (image tokens and padding). Shifted inside, as for causal LMs.

        Returns:
            `MagmaCausalLMOutputWithPast` with `logits` `[b, seq, vocab]` and `loss` when `labels` are given.
        """
        # return_dict: read as an output below, whatever config.return_dict says
        outputs = self.model(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, inputs_embeds=inputs_embeds, mm_encoder_outputs=mm_encoder_outputs, return_dict=True, **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None if labels is None else self.loss_function(
            logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
        )
        return MagmaCausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions, image_outputs=outputs.image_outputs,
        )


__all__ = [
    "MagmaForConditionalGeneration",
    "MagmaImageEncoder",
    "MagmaVisionModel",
    "MagmaVisionPreTrainedModel",
    "MagmaModel",
    "MagmaMultiModalProjector",
    "MagmaPreTrainedModel",
]
