"""`magma_hf` in vLLM's environment (older transformers, no torchvision): the config and the processors load and give
what they give in the transformers model's environment, and the model says which transformers it needs.

Run by `make test-vllm` with `.venv-vllm`'s python; the reference runs with `MAGMA_HF_REFERENCE_PYTHON` (`.venv`).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
REFERENCE_PYTHON = os.environ.get("MAGMA_HF_REFERENCE_PYTHON")
# Keys that differ by environment, not by meaning: the code export's `auto_map` and `custom_pipelines` (kept where
# MAGMA's pipeline is not registered, as here), the writer's transformers version and the folder's path.
ENVIRONMENT_KEYS = {"auto_map", "custom_pipelines", "transformers_version", "_name_or_path"}

# Saves a tiny MAGMA with its processor, then prints its config as loaded there and saves what the processor makes
# of the inputs `processor_inputs` builds (the same code runs on both sides).
PROCESSOR_INPUTS = """
import numpy as np
from PIL import Image

def processor_inputs():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)) for size in [(50, 70, 3), (90, 40, 3)]]
    texts = ["a photo of", "<|image|> first <|image|> second", "no image at all"]
    return {"images": [[images[0]], images, []], "text": texts, "return_tensors": "np", "padding": True}
"""
REFERENCE_SCRIPT = (
    PROCESSOR_INPUTS
    + """
import json, sys
from tests.helpers import make_processor, make_tokenizer, save_tiny_magma
tokenizer = make_tokenizer()
processor = make_processor(tokenizer)
model = save_tiny_magma(sys.argv[1], tokenizer, processor)
outputs = processor(**processor_inputs())
np.savez(sys.argv[1] + "/../reference.npz", **outputs)
from transformers import AutoConfig
print(json.dumps(AutoConfig.from_pretrained(sys.argv[1]).to_dict()))
"""
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    if not REFERENCE_PYTHON or not Path(REFERENCE_PYTHON).exists():
        pytest.skip("MAGMA_HF_REFERENCE_PYTHON (the python of the model's environment, .venv) is unset: make test-vllm")
    folder = tmp_path_factory.mktemp("environment") / "magma"
    result = subprocess.run(
        [REFERENCE_PYTHON, "-c", REFERENCE_SCRIPT, str(folder)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, json.loads(result.stdout.strip().splitlines()[-1])


def _without_environment_keys(config: dict) -> dict:
    return {
        key: _without_environment_keys(value) if isinstance(value, dict) else value
        for key, value in config.items()
        if key not in ENVIRONMENT_KEYS
    }


def test_import_registers_config_and_processors_and_names_the_version_the_model_needs():
    import magma_hf

    expected = Version(transformers.__version__).release >= Version(magma_hf.MODELING_MIN_TRANSFORMERS).release
    assert magma_hf.MODELING_AVAILABLE is expected
    assert transformers.AutoConfig.for_model("magma").__class__ is magma_hf.MagmaConfig
    if not expected:
        found = re.escape(transformers.__version__)
        with pytest.raises(ImportError, match=rf"transformers >= 5\.24; this environment has {found}"):
            magma_hf.MagmaForConditionalGeneration  # noqa: B018
        assert "magma_hf.modeling_magma" not in sys.modules
        # what runs without the model: the data readers, and captioning with --engine vllm
        assert callable(magma_hf.load_image_caption_dataset) and callable(magma_hf.caption_images)
        assert "magma_hf.modeling_magma" not in sys.modules


def test_config_loads_as_in_the_model_environment(reference):
    from transformers import AutoConfig

    import magma_hf  # noqa: F401 (registers the config)

    folder, reference_config = reference
    config = AutoConfig.from_pretrained(folder)
    assert type(config).__name__ == "MagmaConfig"
    loaded = json.loads(json.dumps(config.to_dict()))  # as the reference came: through JSON
    assert _without_environment_keys(loaded) == _without_environment_keys(reference_config)
    assert config.num_image_tokens == config.vision_config.num_image_tokens > 0


def test_processor_gives_what_it_gives_in_the_model_environment(reference):
    from transformers import AutoProcessor

    import magma_hf

    folder, _ = reference
    processor = AutoProcessor.from_pretrained(folder)
    assert isinstance(processor, magma_hf.MagmaProcessor)
    # transformers' default backend, torchvision, where that environment has it: equal pixel values either way
    image_processors = (magma_hf.MagmaImageProcessorTorchvision, magma_hf.MagmaImageProcessor)
    assert isinstance(processor.image_processor, image_processors)
    namespace: dict = {}
    exec(PROCESSOR_INPUTS, namespace)
    outputs = processor(**namespace["processor_inputs"]())
    expected = np.load(folder.parent / "reference.npz")
    assert sorted(outputs) == sorted(expected.files)
    for key in expected.files:
        np.testing.assert_array_equal(np.asarray(outputs[key]), expected[key], err_msg=key)
