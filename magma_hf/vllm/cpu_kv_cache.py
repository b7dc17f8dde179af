"""A KV cache that fits, for MAGMA on vLLM's CPU backend when the user chose no size.

Left to itself, vLLM's CPU worker reserves `gpu_memory_utilization` (0.92 by default) of the machine's memory and
refuses to start unless that much is free at start-up ("Available memory on node 0 (20.84/23.54 GiB) ... is less than
desired CPU memory utilization"), which on a machine with anything else running it never is; the KV cache then takes
all of it but the model. The plugin (`magma_hf.vllm.register`) wraps the CPU platform's `check_and_update_config` so
that, for a MAGMA model whose user set none of `VLLM_CPU_KVCACHE_SPACE`, `kv_cache_memory_bytes`
(`--kv-cache-memory-bytes`) and `gpu_memory_utilization` (`--gpu-memory-utilization`), the KV cache gets an explicit
size, logged: what `max_num_seqs` sequences of `max_model_len` tokens need, at most 4 GiB (vLLM's own former CPU
default) and at most half the memory available once the model's weight files are loaded; at least one sequence of
`max_model_len` tokens (which vLLM needs to start; where even that is not free, vLLM says so, naming
`VLLM_CPU_KVCACHE_SPACE`). Other models and other platforms are left as vLLM configures them.

Imports vLLM only when called (the plugin loads in every vLLM process).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

GiB = 1 << 30
MAX_DEFAULT_BYTES = 4 * GiB  # VLLM_CPU_KVCACHE_SPACE's default before vLLM sized the CPU cache from the utilization
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
_MARK = "_magma_hf_kv_cache_default"


def install() -> None:
    """Wrap the CPU platform's `check_and_update_config` (once; nothing on other platforms)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    platform = type(current_platform)
    original = platform.__dict__.get("check_and_update_config")
    if original is None or getattr(original.__func__, _MARK, False):
        return

    def check_and_update_config(cls, vllm_config) -> None:
        original.__func__(cls, vllm_config)
        choose(vllm_config)

    setattr(check_and_update_config, _MARK, True)
    platform.check_and_update_config = classmethod(check_and_update_config)


def user_chose_a_size(cache_config) -> bool:
    """`VLLM_CPU_KVCACHE_SPACE` (which vLLM's platform turns into `kv_cache_memory_bytes`), `kv_cache_memory_bytes`
    or a `gpu_memory_utilization` other than vLLM's default."""
    (field,) = [f for f in dataclasses.fields(cache_config) if f.name == "gpu_memory_utilization"]
    default = getattr(field.default, "default", field.default)  # a pydantic Field(default=...) in vLLM 0.32
    return (
        os.environ.get("VLLM_CPU_KVCACHE_SPACE", "") != ""
        or cache_config.kv_cache_memory_bytes is not None
        or cache_config.gpu_memory_utilization != default
    )


def weight_bytes(model: str) -> int:
    """The size of a local folder's weight files (0 for a Hub id: not known before the download)."""
    folder = Path(model)
    if not folder.is_dir():
        return 0
    return sum(path.stat().st_size for path in folder.iterdir() if path.suffix in WEIGHT_SUFFIXES and path.is_file())


def choose(vllm_config) -> int | None:
    """Set and log the KV cache size of a MAGMA model whose user chose none; the size chosen, or None."""
    import psutil
    from vllm.logger import init_logger

    from magma_hf.vllm import ARCHITECTURE

    model, cache = vllm_config.model_config, vllm_config.cache_config
    if model is None or ARCHITECTURE not in (model.architectures or []) or user_chose_a_size(cache):
        return None
    parallel = vllm_config.parallel_config
    # K and V of every layer, in the model's dtype (the cache's with cache_dtype "auto"; a smaller cache dtype only
    # makes this an overestimate)
    token_bytes = 2 * model.get_num_layers(parallel) * model.get_num_kv_heads(parallel) * model.get_head_size()
    token_bytes *= model.dtype.itemsize
    sequence_bytes = math.ceil(model.max_model_len / cache.block_size) * cache.block_size * token_bytes
    needed = vllm_config.scheduler_config.max_num_seqs * sequence_bytes
    available = psutil.virtual_memory().available
    weights = weight_bytes(model.model)
    half_of_the_rest = max(available - weights, 0) // 2
    size = max(min(needed, MAX_DEFAULT_BYTES, half_of_the_rest), sequence_bytes)
    cache.kv_cache_memory_bytes = size
    init_logger("vllm.magma_hf").info(
        "MAGMA plugin: no KV cache size chosen (VLLM_CPU_KVCACHE_SPACE, --kv-cache-memory-bytes and "
        "--gpu-memory-utilization unset), so the KV cache gets %.3f GiB: the least of what %d sequences of %d tokens "
        "need (%.3f GiB), 4 GiB and half of the %.2f GiB available after the %.2f GiB of weight files. Set "
        "VLLM_CPU_KVCACHE_SPACE (GiB) or --kv-cache-memory-bytes to choose it.",
        size / GiB, vllm_config.scheduler_config.max_num_seqs, model.max_model_len, needed / GiB, available / GiB,
        weights / GiB,
    )  # fmt: skip
    return size
