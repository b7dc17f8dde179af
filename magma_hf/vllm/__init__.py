"""MAGMA in vLLM: the model in vLLM's model API, its multimodal processor, and the plugin that registers them.

vLLM finds MAGMA through the `vllm.general_plugins` entry point this package declares (pyproject.toml), which calls
`register` in every vLLM process: `LLM(model=folder)` and `vllm serve folder` then load any MAGMA folder (the
converter's or `save_pretrained`'s) with no user code. Nothing here imports vLLM, torch or transformers at import time:
plugins load in every vLLM process, the API server's included.

This subpackage is not part of the Hub code export; it imports only the config, processor, adapter and weight-name
modules of the package, never `modeling_magma` (open_clip is not needed in vLLM's environment).
"""

from __future__ import annotations

# The architecture a saved MAGMA folder names in config.json, and the vLLM class that implements it, imported lazily
# by vLLM ("module:Class"): registering must not import torch models in the API server process.
ARCHITECTURE = "MagmaForConditionalGeneration"
MODEL_CLASS = "magma_hf.vllm.model:MagmaForConditionalGeneration"


def register() -> None:
    """The plugin: MAGMA's architecture in vLLM's `ModelRegistry`, its config and processor in transformers' Auto
    classes (vLLM reads the config and the processor through them). Safe to call more than once."""
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor
    from vllm import ModelRegistry

    from ..configuration_magma import MagmaConfig, MagmaVisionConfig
    from ..image_processing_magma import MagmaImageProcessor
    from ..processing_magma import MagmaProcessor

    AutoConfig.register(MagmaConfig.model_type, MagmaConfig, exist_ok=True)
    AutoConfig.register(MagmaVisionConfig.model_type, MagmaVisionConfig, exist_ok=True)
    # The faithful PIL processor for both standard backends, as `import magma_hf` registers it.
    backends = {"pil": MagmaImageProcessor, "torchvision": MagmaImageProcessor}
    AutoImageProcessor.register(MagmaConfig, image_processor_classes=backends, exist_ok=True)
    AutoProcessor.register(MagmaConfig, MagmaProcessor, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)


__all__ = ["ARCHITECTURE", "MODEL_CLASS", "register"]
