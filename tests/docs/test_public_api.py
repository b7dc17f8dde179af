"""What users import: everything from `magma_hf` itself, and the converter's `python -m` entry."""

import subprocess
import sys
from pathlib import Path

import pytest

import magma_hf

# What the README and docs show users importing, by the name they import it under.
DOCUMENTED_API = (
    "MagmaForConditionalGeneration",
    "MagmaProcessor",
    "MagmaConfig",
    "MagmaAdapterConfig",
    "MagmaTrainer",
    "MagmaLRSchedule",
    "MagmaDataCollator",
    "MagmaTrainingConfig",
    "train",
    "convert_dataset",
    "from_hf_dataset",
    "iter_img2dataset",
    "load_img2dataset",
    "load_magma_dataset",
    "evaluate",
    "load_model_and_processor",
    "caption_images",
    "load_adapter_export",
    "convert_magma_checkpoint",
)


@pytest.mark.parametrize("name", DOCUMENTED_API)
def test_documented_names_are_importable_from_the_package(name):
    value = getattr(magma_hf, name)
    assert name in magma_hf.__all__ and name in dir(magma_hf)
    assert getattr(value, "__name__", name) == name  # the object itself, not a module of the same name


def test_an_unknown_name_is_an_attribute_error_naming_it():
    with pytest.raises(AttributeError, match="no attribute 'no_such_thing'"):
        magma_hf.no_such_thing  # noqa: B018


def run_python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)


def test_import_magma_hf_leaves_training_evaluation_and_conversion_unimported():
    code = (
        "import sys, magma_hf; "
        "print(sorted(m for m in sys.modules if m.startswith(('magma_hf.training', 'magma_hf.evaluation', "
        "'magma_hf.conversion'))))"
    )
    result = run_python("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.slow
def test_python_m_magma_hf_conversion_runs_the_converter_command_line(tmp_path):
    result = run_python("-m", "magma_hf.conversion", "--help")
    assert result.returncode == 0, result.stderr
    assert "--checkpoint" in result.stdout and "--output" in result.stdout
    # and it converts: a missing checkpoint is named, not silently ignored
    missing = tmp_path / "missing.pt"
    result = run_python("-m", "magma_hf.conversion", "--checkpoint", str(missing), "--output", str(tmp_path / "out"))
    assert result.returncode != 0
    assert "missing.pt" in result.stdout + result.stderr
    assert not (tmp_path / "out").exists()


def test_only_the_function_is_named_convert_magma_checkpoint():
    """The converter's command line is `python -m magma_hf.conversion` or `magma-hf convert`: no module of the
    function's name shadows it, whatever is imported."""
    import magma_hf.conversion.magma_checkpoint  # noqa: F401

    assert not list(Path(magma_hf.__file__).parent.glob("convert_magma_checkpoint*"))
    function = magma_hf.convert_magma_checkpoint
    assert type(function).__name__ == "function" and function.__module__ == "magma_hf.conversion.magma_checkpoint"
