"""Fixtures of the vLLM tests: the reference (tiny MAGMA folders and the transformers model's outputs, made by
`make_reference.py` with the model environment's python) and one vLLM engine at a time, shared by the tests.

Run by `make test-vllm` in `.venv-vllm` (`--confcutdir tests/vllm`: the suite's own conftest needs `.venv`). Where vLLM
is not installed (`make test` in `.venv`) the files that need it are not collected.
"""

import gc
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
from reference_setup import ENGINE_KWARGS

REPO = Path(__file__).resolve().parents[2]
# vLLM installed, not this folder (pytest puts tests/ on sys.path for tests/conftest.py: a namespace `vllm` there)
_VLLM_SPEC = importlib.util.find_spec("vllm")
HAS_VLLM = _VLLM_SPEC is not None and _VLLM_SPEC.origin is not None
# Files here that need vLLM itself; test_environment.py runs in both environments.
collect_ignore = [] if HAS_VLLM else [f"test_vllm_{name}.py" for name in ("model", "plugin", "readme", "server")]

# vLLM on a small CPU: the engine in this process (no engine-core and worker processes to start per engine), a small
# KV cache, nothing from the Hub.
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
for _key, _value in VLLM_ENV.items():
    os.environ.setdefault(_key, _value)
def reference_python() -> str:
    python = os.environ.get("MAGMA_HF_REFERENCE_PYTHON")
    if not python or not Path(python).exists():
        pytest.skip(
            "MAGMA_HF_REFERENCE_PYTHON (the python of the transformers model's environment, .venv) is unset or "
            f"missing ({python!r}): run make test-vllm"
        )
    return python


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> dict:
    """`make_reference.py`'s folders and `reference.json`, plus `"dir"`: where they are."""
    folder = tmp_path_factory.mktemp("vllm-reference")
    result = subprocess.run(
        [reference_python(), str(Path(__file__).with_name("make_reference.py")), str(folder)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((folder / "reference.json").read_text())
    data["dir"] = folder
    return data


@pytest.fixture(scope="session")
def reference_images(reference) -> list:
    from PIL import Image

    return [Image.open(reference["dir"] / name).convert("RGB") for name in reference["images"]]


class Engines:
    """One `vllm.LLM` per model folder, only the last one alive (each holds its KV cache)."""

    def __init__(self):
        self.folder, self.llm = None, None

    def __call__(self, folder: Path):
        if folder != self.folder:
            self.close()
            from vllm import LLM

            # the engine in this process, as the tests run it
            self.llm = LLM(model=str(folder), distributed_executor_backend="uni", **ENGINE_KWARGS)
            self.folder = folder
        return self.llm

    def close(self) -> None:
        if self.llm is not None:
            self.folder, self.llm = None, None
            gc.collect()  # LLMEngine.__del__ shuts its engine down


@pytest.fixture(scope="session")
def engines():
    engines = Engines()
    yield engines
    engines.close()
