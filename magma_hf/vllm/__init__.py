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
    classes (vLLM reads the config and the processor through them; `import magma_hf` registers those), and on the CPU
    a KV cache size that fits the machine for a MAGMA model whose user chose none (`cpu_kv_cache`). Safe to call more
    than once."""
    from vllm import ModelRegistry

    import magma_hf  # noqa: F401  (registers MAGMA's config and processors with transformers' Auto classes)

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    # On vLLM's CPU backend, a KV cache that fits where the user chose no size (cpu_kv_cache.py says why)
    from magma_hf.vllm import cpu_kv_cache

    cpu_kv_cache.install()


__all__ = ["ARCHITECTURE", "MODEL_CLASS", "register"]
