"""Training checkpoints are complete or absent: a resume skips an incomplete one with a warning naming it, rotation
never deletes the only complete one, and a run killed with SIGKILL while saving resumes from the last complete
checkpoint with the uninterrupted run's losses. Also under DeepSpeed ZeRO-2 and ZeRO-3, configured the way
`accelerate config` writes it (2 CPU processes, no `training_args.use_cpu`)."""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_training import CONFIGS, REPO, write_magma_dataset

from magma_hf.training.run import (
    EXPORT_DIR_NAME,
    MagmaTrainingConfig,
    resolve_checkpoint,
    resolve_deepspeed,
    training_arguments_kwargs,
)
from magma_hf.training.trainer import MAGMA_WEIGHTS_NAME
from tests.helpers import files_unchanged, make_tokenizer

HOOKED_TRAIN = Path(__file__).parent / "train_with_test_hooks.py"


def checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    """A checkpoint folder as a save leaves it: weights, and `trainer_state.json` (written last) when complete."""
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / MAGMA_WEIGHTS_NAME).write_bytes(b"weights of step %d" % step)
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def run_config(save: Path, **values) -> MagmaTrainingConfig:
    base = {"batch_size": 4, "train_steps": 6, "train_dataset_dir": "d", "save": str(save), "model_config": {}}
    return MagmaTrainingConfig.from_dict({**base, **values})


@pytest.fixture
def magma_warnings(caplog):
    caplog.set_level(logging.WARNING, logger="magma_hf")
    return caplog


# ---------------------------------------------------------------------------------------------------------------------
# Resume: which checkpoint


def test_resume_skips_an_incomplete_checkpoint_with_a_warning(tmp_path, magma_warnings):
    """A kill during the save of checkpoint-6 (by a version that wrote in place) left it without trainer_state.json:
    the resume takes checkpoint-3 and names the one it skips."""
    run = tmp_path / "run"
    checkpoint(run, 3)
    checkpoint(run, 6, complete=False)
    (run / "checkpoint-9").mkdir()  # an empty one too
    with files_unchanged(run, no_new_files=True):
        assert resolve_checkpoint(run_config(run, load=str(run))) == str(run / "checkpoint-3")
    assert f"Skipping the checkpoint {run / 'checkpoint-9'}" in magma_warnings.text
    assert f"Skipping the checkpoint {run / 'checkpoint-6'}: it has no trainer_state.json" in magma_warnings.text


def test_resume_from_an_incomplete_checkpoint_is_an_error_naming_it(tmp_path):
    run = tmp_path / "run"
    checkpoint(run, 3)
    incomplete = checkpoint(run, 6, complete=False)
    (run / "checkpoint-9").mkdir()
    (run / "checkpoint-9" / "trainer_state.json").write_text('{"global_st')  # cut off mid-write
    with files_unchanged(run, no_new_files=True):
        expected = rf"{re.escape(str(incomplete))}: it has no trainer_state.json.*beside it is .*checkpoint-3"
        with pytest.raises(ValueError, match=expected):
            resolve_checkpoint(run_config(tmp_path / "new", load=str(incomplete)))
        with pytest.raises(ValueError, match=r"checkpoint-9: its trainer_state.json cannot be read"):
            resolve_checkpoint(run_config(tmp_path / "new", load=str(run / "checkpoint-9")))


def test_load_of_another_run_without_a_complete_checkpoint_is_an_error(tmp_path):
    """Only `load` = `save` may start at step 0 ("nothing saved yet"); another run's folder whose checkpoints are all
    incomplete is an error naming them, not a silent fresh start."""
    run = tmp_path / "run"
    checkpoint(run, 3, complete=False)
    with files_unchanged(run, no_new_files=True):
        with pytest.raises(ValueError, match=rf"No complete checkpoint in load={re.escape(str(run))}.*checkpoint-3"):
            resolve_checkpoint(run_config(tmp_path / "new", load=str(run)))
        assert resolve_checkpoint(run_config(run, load=str(run))) is None


def test_rotation_counts_and_deletes_complete_checkpoints_only(tmp_path):
    from magma_hf.training.trainer import rotate_complete_checkpoints

    run = tmp_path / "run"
    old, kept, new = checkpoint(run, 2), checkpoint(run, 4), checkpoint(run, 6)
    stray = checkpoint(run, 8, complete=False)  # highest step, incomplete: Trainer's rotation would keep it, drop 6
    with files_unchanged(stray, kept, new):
        rotate_complete_checkpoints(run, limit=2, keep={str(new)})
    assert not old.exists() and kept.is_dir() and new.is_dir()
    with files_unchanged(stray, new):
        rotate_complete_checkpoints(run, limit=1, keep={str(new)})
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-6", "checkpoint-8"]


# ---------------------------------------------------------------------------------------------------------------------
# DeepSpeed as `accelerate config` writes it: TrainingArguments must see the CPU


def test_accelerate_deepspeed_on_cpu_sets_use_cpu(monkeypatch):
    """accelerate's DeepSpeed launcher exports ACCELERATE_USE_DEEPSPEED but not ACCELERATE_USE_CPU."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert training_arguments_kwargs(run_config(Path("s")), processes=2)["use_cpu"] is True
    explicit = run_config(Path("s"), training_args={"use_cpu": False})
    assert training_arguments_kwargs(explicit, processes=2)["use_cpu"] is False  # the user's word stands
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    assert resolve_deepspeed(run_config(Path("s"))) is None  # the launcher's DeepSpeed config
    with pytest.raises(ValueError, match="accelerate config sets DeepSpeed's gradient_accumulation_steps: 1, the "
                                         "training config gradient_accumulation_steps: 2"):  # fmt: skip
        resolve_deepspeed(run_config(Path("s"), gradient_accumulation_steps=2))
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    assert "use_cpu" not in training_arguments_kwargs(run_config(Path("s")), processes=2)


# ---------------------------------------------------------------------------------------------------------------------
# Killed with SIGKILL while saving a checkpoint, then the same command again


def tiny_yaml(root: Path) -> Path:
    """train_tiny_cpu.yml on the test's data, without `training_args.use_cpu` (as a GPU user's config would be)."""
    values = yaml.safe_load((CONFIGS / "train_tiny_cpu.yml").read_text())
    values.update(train_dataset_dir=str(root / "data"), tokenizer_name_or_path=str(root / "tokenizer"))
    values["training_args"].pop("use_cpu")
    path = root / "tiny.yml"
    path.write_text(yaml.safe_dump(values))
    return path


def read_losses(log: Path) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in map(json.loads, log.read_text().splitlines())}


def hooked_command(launcher: str | None) -> list[str]:
    if launcher is None:
        return [sys.executable, str(HOOKED_TRAIN)]
    with socket.socket() as sock:  # a port of its own: two launches on the default 29500 would meet
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", launcher,
            "--main_process_port", str(port), str(HOOKED_TRAIN)]  # fmt: skip


def train_killed_while_saving(command: list[str], root: Path, step: int, processes: int, env: dict) -> str:
    """Run `command` until every process hangs inside the save of checkpoint `step`, then SIGKILL all of them (the
    workers by pid: torch's launcher starts each in its own session; the launcher's process group). Its output."""
    marker = root / "hang"
    env = {**env, "MAGMA_TEST_HANG_AT_SAVE": str(step), "MAGMA_TEST_HANG_MARKER": str(marker)}
    with open(root / "killed.log", "w") as output:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
        markers = [Path(f"{marker}.rank{rank}") for rank in range(processes)]
        deadline = time.monotonic() + 600
        while not all(m.exists() for m in markers):
            assert process.poll() is None, (root / "killed.log").read_text()[-5000:]
            assert time.monotonic() < deadline, "the run never reached the save"
            time.sleep(0.2)
        for m in markers:
            os.kill(int(m.read_text()), signal.SIGKILL)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    return (root / "killed.log").read_text()


def train_again(command: list[str], env: dict) -> str:
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def logging_losses_to(log: Path) -> dict:
    return {**ENV, "MAGMA_TEST_LOSS_LOG": str(log)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_magma_dataset(root / "data")
    make_tokenizer().save_pretrained(root / "tokenizer")
    return root


@pytest.mark.slow
def test_killed_while_saving_resumes_from_the_last_complete_checkpoint(data, tmp_path):
    """One process, no DeepSpeed. SIGKILL in the save of checkpoint-6 (its weights, optimizer and RNG state written,
    trainer_state.json not yet); a stray incomplete checkpoint-99 of an older version sits in the folder too. The same
    command again resumes from checkpoint-3, with the killed run's loss at step 4, and rotates with
    save_total_limit=1 without touching checkpoint-99 or deleting the new complete checkpoint-6."""
    run = tmp_path / "run"
    stray = checkpoint(run, 99, complete=False)
    arguments = ["train", str(tiny_yaml(data)), f"save={run}", f"load={run}", "train_steps=6", "save_every=3",
                 "eval_every=3", "training_args.save_total_limit=1", "num_caption_samples=0"]  # fmt: skip
    command = hooked_command(None) + arguments
    train_killed_while_saving(command, tmp_path, step=6, processes=1, env=logging_losses_to(tmp_path / "killed.jsonl"))
    uninterrupted = read_losses(tmp_path / "killed.jsonl")
    assert sorted(uninterrupted) == [1, 2, 3, 4, 5, 6]
    assert not (run / "checkpoint-6").exists() and (run / "tmp-checkpoint-6").is_dir()  # complete or absent

    with files_unchanged(stray):
        output = train_again(command, logging_losses_to(tmp_path / "resumed.jsonl"))
    assert f"Skipping the checkpoint {stray}" in output
    assert f"Removing {run / 'tmp-checkpoint-6'}: an interrupted checkpoint save" in output
    losses = read_losses(tmp_path / "resumed.jsonl")
    assert sorted(losses) == [4, 5, 6]  # resumed after step 3
    assert losses[4] == pytest.approx(uninterrupted[4], abs=1e-6)
    assert losses[6] == pytest.approx(uninterrupted[6], abs=1e-5)
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-6", "checkpoint-99"]
    assert (run / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_accelerate_deepspeed_two_cpu_processes_killed_while_saving(data, tmp_path, stage):
    """`accelerate launch` with configuration/accelerate/cpu_deepspeed_zero{stage}.yaml (inline DeepSpeed settings,
    `use_cpu: true`, 2 processes, as `accelerate config` writes them) and a training config without
    `training_args.use_cpu`. Both processes are killed while saving checkpoint-8, after DeepSpeed's engine wrote its
    shards; the same command again resumes from checkpoint-4 with the uninterrupted losses, and writes the final model
    and the adapter export."""
    from transformers import AutoModelForImageTextToText

    run = tmp_path / "run"
    launcher = str(CONFIGS / "accelerate" / f"cpu_deepspeed_zero{stage}.yaml")
    command = hooked_command(launcher) + ["train", str(tiny_yaml(data)), f"save={run}", f"load={run}"]
    first = train_killed_while_saving(
        command, tmp_path, step=8, processes=2, env=logging_losses_to(tmp_path / "killed.jsonl")
    )
    assert "Skipping sample: cannot decode image" in first
    assert (run / "checkpoint-4" / "global_step4").is_dir()  # DeepSpeed's own checkpoint, without GPT-J
    assert (run / "checkpoint-4" / MAGMA_WEIGHTS_NAME).is_file()
    assert (run / "tmp-checkpoint-8" / "checkpoint-8" / "global_step8").is_dir() and not (run / "checkpoint-8").exists()
    uninterrupted = read_losses(tmp_path / "killed.jsonl")
    assert sorted(uninterrupted) == list(range(1, 9))
    assert sum(uninterrupted[s] for s in (6, 7, 8)) / 3 < sum(uninterrupted[s] for s in (1, 2, 3)) / 3 - 0.05

    with files_unchanged(run / "checkpoint-4"):
        train_again(command, logging_losses_to(tmp_path / "resumed.jsonl"))
    assert json.loads((run / "checkpoint-8" / "trainer_state.json").read_text())["global_step"] == 8
    resumed = read_losses(tmp_path / "resumed.jsonl")
    assert sorted(resumed) == [5, 6, 7, 8]
    assert resumed[5] == pytest.approx(uninterrupted[5], abs=1e-6)  # the step after the checkpoint
    assert resumed[8] == pytest.approx(uninterrupted[8], abs=1e-5)
    assert not (run / "tmp-checkpoint-8").exists()
    full = AutoModelForImageTextToText.from_pretrained(run).state_dict()
    prefix = load_file(run / EXPORT_DIR_NAME / "image_prefix.safetensors")  # gathered from the shards under ZeRO-3
    assert prefix and all(torch.equal(tensor, full[name]) for name, tensor in prefix.items())
    adapters = load_file(run / EXPORT_DIR_NAME / "adapter_model.safetensors")
    assert adapters and all(tensor.numel() > 0 for tensor in adapters.values())
