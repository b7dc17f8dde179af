"""`magma-hf` with test-only hooks, for the kill tests of tests/training/test_training_checkpoints.py and
test_training_streaming.py (run as a script, also under `accelerate launch`):

- `MAGMA_TEST_LOSS_LOG=PATH`: the main process appends every logged training loss, at full precision, to PATH as
  `{"step": N, "loss": L}` lines (Trainer's own `trainer_state.json` of a killed run is never written);
- `MAGMA_TEST_HANG_AT_SAVE=N`: while saving checkpoint N, after every file but `trainer_state.json` (the model's,
  the optimizer's, DeepSpeed's shards, the RNG state), each process writes its pid to
  `$MAGMA_TEST_HANG_MARKER.rank{R}` and sleeps: the test then kills it with SIGKILL, mid-save;
- `MAGMA_TEST_KEY_LOG=PATH`: each process appends the sample keys of every training batch it trains on, in order, to
  `PATH.rank{R}` as `{"step": N, "keys": [...]}` lines (N: the optimizer step the batch belongs to);
- `MAGMA_TEST_KILL_AT_STEP=N`: each process SIGKILLs itself as it starts the forward of step N (steps before N are
  done, and so is any checkpoint they saved).
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

from magma_hf.cli import main
from magma_hf.training.collator import MagmaDataCollator
from magma_hf.training.trainer import MagmaTrainer

TEST_KEYS = "magma_test_keys"


def install_hooks() -> None:
    loss_log = os.environ.get("MAGMA_TEST_LOSS_LOG")
    hang_at = os.environ.get("MAGMA_TEST_HANG_AT_SAVE")
    log, save_rng_state = MagmaTrainer.log, MagmaTrainer._save_rng_state

    def logging_losses(self, logs, *args, **kwargs):
        if loss_log and "loss" in logs and self.is_world_process_zero():
            with open(loss_log, "a") as file:
                file.write(json.dumps({"step": self.state.global_step, "loss": logs["loss"]}) + "\n")
        return log(self, logs, *args, **kwargs)

    def hanging_save(self, output_dir):
        save_rng_state(self, output_dir)
        if hang_at and self.state.global_step == int(hang_at):
            marker = Path(f"{os.environ['MAGMA_TEST_HANG_MARKER']}.rank{self.args.process_index}")
            temporary = marker.with_name(marker.name + ".tmp")  # one per rank: the ranks write at the same time
            temporary.write_text(str(os.getpid()))
            temporary.rename(marker)  # the test reads a whole pid
            while True:
                time.sleep(1)

    MagmaTrainer.log, MagmaTrainer._save_rng_state = logging_losses, hanging_save
    install_stream_hooks()


def install_stream_hooks() -> None:
    key_log = os.environ.get("MAGMA_TEST_KEY_LOG")
    kill_at = os.environ.get("MAGMA_TEST_KILL_AT_STEP")
    collate, compute_loss = MagmaDataCollator.__call__, MagmaTrainer.compute_loss

    def collate_with_keys(self, samples):  # runs in the data-loader workers: the keys travel in the batch
        return {**collate(self, samples), TEST_KEYS: [sample.get("key") for sample in samples]}

    def recording_compute_loss(self, model, inputs, *args, **kwargs):
        inputs = dict(inputs)
        keys = inputs.pop(TEST_KEYS, None)
        if model.training and kill_at and self.state.global_step + 1 == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
        if model.training and key_log and keys is not None:
            with open(f"{key_log}.rank{self.args.process_index}", "a") as file:
                file.write(json.dumps({"step": self.state.global_step + 1, "keys": keys}) + "\n")
        return compute_loss(self, model, inputs, *args, **kwargs)

    MagmaDataCollator.__call__, MagmaTrainer.compute_loss = collate_with_keys, recording_compute_loss


if __name__ == "__main__":
    install_hooks()
    sys.exit(main())
