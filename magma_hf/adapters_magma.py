"""MAGMA's bottleneck adapters as a PEFT method.

An adapter is `up(relu(down(x)))` (optionally LayerNorm first), added to the output of a transformer block's MLP or
attention module:

- `normal`:          y = f(x);  y + adapter(y)                    (sequential, after the module)
- `parallel`:        f(x) + adapter(x)                            (parallel to the module, reading its input)
- `scaled_parallel`: f(x) + scale * adapter(x), `scale` learned, initialised to 1

The adapter is non-linear, so it cannot be merged into the base weights. The layer wraps the whole module (GPT-J's
`mlp`, or `attn` whose forward returns a tuple) and keeps each adapter's weights in flat per-adapter containers
(`magma_down[name]`, `magma_up[name]`, ...), which is the layout peft's save/load code expects.

peft only registers methods named in its own `PeftType` enum, so this module writes the same registry entries that
`peft.utils.register_peft_method` would, under the package's own enum `MagmaPeftType`. Import `magma_hf` (or this
module) before `PeftModel.from_pretrained` on a MAGMA adapter.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import mapping
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .configuration_magma import (
    ADAPTER_LOCATIONS,
    DEFAULT_ADAPTER_CONFIG,
    check_adapter_locations,
    normalize_adapter_config,
)

ADAPTER_INIT_STD = 1e-3  # the original MAGMA initialisation: normal(0, 1e-3), clamped to +-2 std
NON_MERGEABLE_MESSAGE = (
    "MAGMA adapters cannot be merged into the base weights: an adapter is a non-linear bottleneck "
    "(up(relu(down(x)))) added to a module's output, not a low-rank weight update. Keep the adapter model as it is, "
    "or call `unload()` to get the base model back without the adapters."
)


class MagmaPeftType(str, enum.Enum):
    """peft's `PeftType` is closed to outside methods; this enum gives MAGMA's adapters a type with `.value`."""

    MAGMA = "MAGMA"


@dataclass
class MagmaAdapterConfig(PeftConfig):
    """Configuration of MAGMA adapters, in the original MAGMA schema.

    Args:
        mlp (`dict`, *optional*): Adapter after/parallel to each block's MLP: `adapter_type` (`"normal"`, `"parallel"`
            or `"scaled_parallel"`), `downsample_factor` (hidden size / bottleneck size) and `add_layernorm`.
            Defaults to MAGMA_v1's `{"adapter_type": "normal", "downsample_factor": 4, "add_layernorm": False}`.
        attention (`dict`, *optional*): The same for each block's attention module.
        mlp_module_names (`list[str]`): Names of the MLP modules to wrap (GPT-J: `mlp`).
        attention_module_names (`list[str]`): Names of the attention modules to wrap (GPT-J: `attn`).
        layers_to_transform (`list[int]`, *optional*): Only these block indices get adapters.
    """

    mlp: dict | None = field(default_factory=lambda: dict(DEFAULT_ADAPTER_CONFIG["mlp"]))
    attention: dict | None = None
    mlp_module_names: list[str] = field(default_factory=lambda: ["mlp"])
    attention_module_names: list[str] = field(default_factory=lambda: ["attn"])
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Derived from the configured locations and module names."}
    )
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = MagmaPeftType.MAGMA
        locations = normalize_adapter_config({"mlp": self.mlp, "attention": self.attention})
        if not locations:
            raise ValueError("MagmaAdapterConfig needs an adapter at 'mlp', at 'attention' or at both")
        self.mlp, self.attention = locations.get("mlp"), locations.get("attention")
        self.target_modules = [
            name
            for location, names in (("mlp", self.mlp_module_names), ("attention", self.attention_module_names))
            if locations.get(location)
            for name in names
        ]

    @classmethod
    def from_magma_adapter_config(cls, adapter_config: dict, **kwargs: Any) -> MagmaAdapterConfig:
        """Build from an original MAGMA `adapter_config` (`{"mlp": {...}, "attention": {...}}`), e.g. a
        `MagmaConfig.adapter_config`: split into its locations, which `__post_init__` normalises."""
        adapter_config = adapter_config or {}
        check_adapter_locations(adapter_config)
        return cls(mlp=adapter_config.get("mlp"), attention=adapter_config.get("attention"), **kwargs)

    def location_of(self, module_name: str) -> str:
        """'mlp' or 'attention' for a targeted module's (last) name."""
        short_name = module_name.rsplit(".", 1)[-1]
        if self.mlp and short_name in self.mlp_module_names:
            return "mlp"
        if self.attention and short_name in self.attention_module_names:
            return "attention"
        raise ValueError(
            f"Module {module_name!r} is neither an MLP {self.mlp_module_names} "
            f"nor an attention module {self.attention_module_names}"
        )

    def settings_for(self, location: str) -> dict:
        return self.mlp if location == "mlp" else self.attention


def init_adapter_tensor_(tensor: torch.Tensor) -> None:
    """MAGMA's adapter init, in place; skips tensors that transformers marked as loaded from a checkpoint."""
    if getattr(tensor, "_is_hf_initialized", False):
        return
    with torch.no_grad():
        tensor.normal_(0.0, ADAPTER_INIT_STD).clamp_(-2 * ADAPTER_INIT_STD, 2 * ADAPTER_INIT_STD)


class MagmaAdapterScales(nn.ParameterDict):
    """The `scaled_parallel` adapters' learned scales, one `[1]` parameter per adapter name, applied by calling this
    module: accelerate's offload hooks (`device_map` with CPU or disk offload) load a module's weights when its forward
    runs, so a scale read by indexing from another module's forward would still be on the meta device."""

    __call__ = nn.Module.__call__  # ParameterDict refuses to be called

    def forward(self, adapter_name: str, hidden_states: torch.Tensor) -> torch.Tensor:
        """`hidden_states` `[..., hidden]` times the adapter's scale."""
        return hidden_states * self[adapter_name]


class MagmaAdapterLayer(nn.Module, BaseTunerLayer):
    """Wraps a block's MLP or attention module and adds MAGMA adapters to its output.

    Input `hidden_states` `[batch, seq, hidden]`; the wrapped module's output is either a tensor of that shape or a
    tuple whose first element is (attention); the adapters change only that tensor.
    """

    adapter_layer_names = ("magma_down", "magma_up", "magma_norm", "magma_scale")
    other_param_names = ("magma_adapter_type",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, hidden_size: int, location: str, **settings):
        super().__init__()
        if location not in ADAPTER_LOCATIONS:
            raise ValueError(f"location must be one of {ADAPTER_LOCATIONS}, got {location!r}")
        self.base_layer = base_layer
        self.hidden_size = hidden_size
        self.location = location
        self.magma_down = nn.ModuleDict()
        self.magma_up = nn.ModuleDict()
        self.magma_norm = nn.ModuleDict()
        self.magma_scale = MagmaAdapterScales()
        self.magma_adapter_type: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **settings)

    def update_layer(
        self, adapter_name: str, adapter_type: str = "normal", downsample_factor: int = 4, add_layernorm: bool = False,
        inference_mode: bool = False, **_: Any,
    ) -> None:
        """Add (or replace) the adapter `adapter_name`, initialised as the original MAGMA did."""
        if self.hidden_size % downsample_factor:
            raise ValueError(
                f"hidden size {self.hidden_size} is not divisible by downsample_factor {downsample_factor}"
            )
        bottleneck = self.hidden_size // downsample_factor
        self.magma_down[adapter_name] = nn.Linear(self.hidden_size, bottleneck)
        self.magma_up[adapter_name] = nn.Linear(bottleneck, self.hidden_size)
        if add_layernorm:
            self.magma_norm[adapter_name] = nn.LayerNorm(self.hidden_size)
        if adapter_type == "scaled_parallel":
            self.magma_scale[adapter_name] = nn.Parameter(torch.ones(1))
        self.magma_adapter_type[adapter_name] = adapter_type
        self.reset_adapter_parameters(adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def reset_adapter_parameters(self, adapter_name: str) -> None:
        for linear in (self.magma_down[adapter_name], self.magma_up[adapter_name]):
            init_adapter_tensor_(linear.weight)
            init_adapter_tensor_(linear.bias)
        if adapter_name in self.magma_norm:
            norm = self.magma_norm[adapter_name]
            for tensor, value in ((norm.weight, 1.0), (norm.bias, 0.0)):
                if not getattr(tensor, "_is_hf_initialized", False):
                    nn.init.constant_(tensor, value)
        if adapter_name in self.magma_scale and not getattr(
            self.magma_scale[adapter_name], "_is_hf_initialized", False
        ):
            nn.init.ones_(self.magma_scale[adapter_name])

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module):
        # The wrapped module is a whole block part without a `.weight`: take its first parameter.
        first = next(base_layer.parameters(), None)
        return (None, None) if first is None else (first.device, first.dtype)

    def bottleneck(self, adapter_name: str, hidden_states: torch.Tensor) -> torch.Tensor:
        """`up(relu(down(norm(x))))` in the adapter's dtype, returned in the input's dtype."""
        down = self.magma_down[adapter_name]
        x = hidden_states.to(down.weight.dtype)
        if adapter_name in self.magma_norm:
            x = self.magma_norm[adapter_name](x)
        out = self.magma_up[adapter_name](torch.relu(down(x)))
        if adapter_name in self.magma_scale:
            out = self.magma_scale(adapter_name, out)
        return out.to(hidden_states.dtype)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        output = self.base_layer(hidden_states, *args, **kwargs)
        if self.disable_adapters:
            return output
        is_tuple = isinstance(output, tuple)
        result = output[0] if is_tuple else output
        for name in self.active_adapters:
            if name not in self.magma_down:
                continue
            if self.magma_adapter_type[name] == "normal":
                result = result + self.bottleneck(name, result)
            else:
                result = result + self.bottleneck(name, hidden_states)
        return (result, *output[1:]) if is_tuple else result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(NON_MERGEABLE_MESSAGE)

    def unmerge(self) -> None:
        raise NotImplementedError(NON_MERGEABLE_MESSAGE)

    def __repr__(self) -> str:
        return "magma." + super().__repr__()


def hidden_size_of(model: nn.Module) -> int:
    hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
    if hidden_size is None:
        raise ValueError("MAGMA adapters need the base model's `config.hidden_size`")
    return hidden_size


class MagmaAdapterModel(BaseTuner):
    """The PEFT tuner that injects [`MagmaAdapterLayer`]s around the configured MLP and attention modules."""

    prefix: str = "magma_"
    tuner_layer_cls = MagmaAdapterLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: MagmaAdapterConfig, model_config: dict) -> MagmaAdapterConfig:
        return peft_config  # target modules are derived from the config's locations

    def _create_and_replace(
        self, peft_config: MagmaAdapterConfig, adapter_name: str, target: nn.Module, target_name: str,
        parent: nn.Module, current_key: str, parameter_name: str | None = None,
    ) -> None:
        location = peft_config.location_of(current_key)
        settings = dict(peft_config.settings_for(location), inference_mode=peft_config.inference_mode)
        if isinstance(target, MagmaAdapterLayer):
            target.update_layer(adapter_name, **settings)
            return
        new_module = MagmaAdapterLayer(target, adapter_name, hidden_size_of(self.model), location, **settings)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # The default copies `child.weight`, which a whole MLP / attention module does not have.
        setattr(parent, child_name, new_module)
        if isinstance(new_module, MagmaAdapterLayer):
            base = child.base_layer if isinstance(child, MagmaAdapterLayer) else child
            first = next(base.parameters(), None)
            if first is not None and first.device.type != "meta":
                for name in MagmaAdapterLayer.adapter_layer_names:
                    getattr(new_module, name).to(first.device)

    def _check_merge_allowed(self) -> None:
        raise ValueError(NON_MERGEABLE_MESSAGE)


def register_magma_peft_method() -> None:
    """Write MAGMA's entries into peft's method registry, as `peft.utils.register_peft_method` would."""
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[MagmaPeftType.MAGMA] = MagmaAdapterConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[MagmaPeftType.MAGMA] = MagmaAdapterModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[MagmaPeftType.MAGMA] = MagmaAdapterModel.prefix


register_magma_peft_method()

__all__ = [
    "MagmaAdapterConfig",
    "MagmaAdapterLayer",
    "MagmaAdapterModel",
    "MagmaPeftType",
    "register_magma_peft_method",
]
