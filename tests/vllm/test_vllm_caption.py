"""`magma-hf caption --engine vllm` (here, in vLLM's environment) writes the records the transformers engine writes
(in the model's environment) for the same folder of images: the same ids, images, prompts and texts."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, reference_python

TIMEOUT_S = 420


def _caption(python: str, images, model, output, *extra: str) -> list[dict]:
    paths = ["--data", str(images), "--model", str(model), "--output", str(output)]
    result = subprocess.run(
        [python, "-m", "magma_hf", "caption", *paths, "--max-new-tokens", "8", "--no-progress", *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    header, *records = (json.loads(line) for line in output.read_text().splitlines())
    assert header["settings"]["engine"] == ("vllm" if "--engine" in extra else "transformers")
    return records


@pytest.mark.parametrize("prompt", [None, "Q: What is in the picture? A:"], ids=["caption", "prompted"])
def test_the_vllm_engine_writes_what_the_transformers_engine_writes(prompt, reference, engines, tmp_path):
    engines.close()  # the command starts its own engine
    images = tmp_path / "images"
    images.mkdir()
    for name in reference["images"]:
        shutil.copy(reference["dir"] / name, images / name)
    model = reference["dir"] / "normal"
    extra = ("--prompt", prompt) if prompt else ()
    expected = _caption(reference_python(), images, model, tmp_path / "transformers.jsonl", *extra)
    served = _caption(sys.executable, images, model, tmp_path / "vllm.jsonl", "--engine", "vllm", *extra)
    assert len(expected) == len(reference["images"])
    assert served == expected
    assert any(record["text"] for record in expected)  # not a comparison of empty answers
