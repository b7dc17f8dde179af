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
