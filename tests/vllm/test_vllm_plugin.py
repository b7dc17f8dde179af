"""vLLM finds MAGMA through the package's `vllm.general_plugins` entry point alone: a fresh python that only calls
vLLM resolves the architecture of a saved folder and reads its config and processor."""

import json
import os
import subprocess
import sys

# Only vLLM is imported and called; the plugin (loaded as `LLM` and `vllm serve` load it) is what makes MAGMA known.
FRESH_VLLM = """
import json, sys
from vllm import ModelRegistry
from vllm.config import ModelConfig
from vllm.plugins import load_general_plugins
from vllm.transformers_utils.processor import cached_get_processor
load_general_plugins()  # as vLLM's engine arguments, `LLM` and `vllm serve` do
config = ModelConfig(model=sys.argv[1], dtype="float32", max_model_len=256)
model_cls, arch = ModelRegistry.resolve_model_cls(config.architectures, config)
print(json.dumps({"arch": arch, "class": f"{model_cls.__module__}.{model_cls.__name__}",
                  "multimodal": config.is_multimodal_model, "config": type(config.hf_config).__name__,
                  "processor": type(cached_get_processor(sys.argv[1])).__name__}))
"""


def test_a_fresh_vllm_process_finds_magma_through_the_entry_point(reference):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # the installed package, as a user has it
    result = subprocess.run(
        [sys.executable, "-c", FRESH_VLLM, str(reference["dir"] / "normal")],
        capture_output=True, text=True, timeout=300, env=env, cwd=reference["dir"],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found == {
        "arch": "MagmaForConditionalGeneration",
        "class": "magma_hf.vllm.model.MagmaForConditionalGeneration",
        "multimodal": True,
        "config": "MagmaConfig",
        "processor": "MagmaProcessor",
    }


GiB = 1 << 30


def kv_cache_bytes(folder, monkeypatch, space: str | None = None, **engine_kwargs) -> int | None:
    """The KV cache size vLLM's engine configuration ends with, with VLLM_CPU_KVCACHE_SPACE set to `space` or unset
    (the tests' conftest sets it; a user's environment has none)."""
    from vllm.engine.arg_utils import EngineArgs

    if space is None:
        monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    else:
        monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", space)
    args = EngineArgs(model=str(folder), dtype="float32", max_model_len=256, max_num_seqs=8, **engine_kwargs)
    return args.create_engine_config().cache_config.kv_cache_memory_bytes


def test_on_the_cpu_the_plugin_sizes_the_kv_cache_of_a_magma_model_whose_user_chose_none(reference, monkeypatch):
    """What 8 sequences of 256 tokens need (K and V of each layer, float32), instead of vLLM's default of reserving
    92% of the machine's memory, which refuses to start where that much is not free."""
    folder = reference["dir"] / "normal"
    text_config = json.loads((folder / "config.json").read_text())["text_config"]
    head_dim = text_config["n_embd"] // text_config["n_head"]
    needed = 8 * 256 * 2 * text_config["n_layer"] * text_config["n_head"] * head_dim * 4
    assert kv_cache_bytes(folder, monkeypatch) == needed


def test_the_plugin_leaves_a_size_the_user_chose(reference, monkeypatch):
    folder = reference["dir"] / "normal"
    assert kv_cache_bytes(folder, monkeypatch, space="2") == 2 * GiB
    assert kv_cache_bytes(folder, monkeypatch, kv_cache_memory_bytes=123 << 20) == 123 << 20
    assert kv_cache_bytes(folder, monkeypatch, gpu_memory_utilization=0.5) is None  # vLLM's own sizing
