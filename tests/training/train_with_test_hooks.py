"""`magma-hf` with two test-only hooks, for the kill tests of tests/training/test_training_checkpoints.py (run as a
script, also under `accelerate launch`):

- `MAGMA_TEST_LOSS_LOG=PATH`: the main process appends every logged training loss, at full precision, to PATH as
  `{"step": N, "loss": L}` lines (Trainer's own `trainer_state.json` of a killed run is never written);
- `MAGMA_TEST_HANG_AT_SAVE=N`: while saving checkpoint N, after every file but `trainer_state.json` (the model's,
  the optimizer's, DeepSpeed's shards, the RNG state), each process writes its pid to
  `$MAGMA_TEST_HANG_MARKER.rank{R}` and sleeps: the test then kills it with SIGKILL, mid-save.
"""

import json
import os
import sys
import time
from pathlib import Path

from magma_hf.cli import main
from magma_hf.training.trainer import MagmaTrainer


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


if __name__ == "__main__":
    install_hooks()
    sys.exit(main())
