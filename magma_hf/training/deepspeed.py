"""DeepSpeed for a training run: the shipped ZeRO configs, and which one `TrainingArguments(deepspeed=...)` gets (the
config's `zero_stage`, the user's `training_args.deepspeed`, or none when `accelerate launch` brings its own).

(Absolute imports: `deepspeed` below is the DeepSpeed package, not this module.)
"""

from __future__ import annotations

import copy
import json
import os
import socket

from transformers.utils import logging

from .config import MagmaTrainingConfig, TrainingConfigError

logger = logging.get_logger(__name__)


# The shipped configuration/deepspeed/zero{1,2,3}.json (a test keeps them equal). "auto" values are filled from
# TrainingArguments, which stays the one source of truth; no optimizer or scheduler section, so MAGMA's parameter
# groups and schedule are used. The fp16 loss scaling is the original's (loss_scale_window 250).
_DEEPSPEED_COMMON = {
    "fp16": {
        "enabled": "auto",
        "loss_scale": 0,
        "loss_scale_window": 250,
        "initial_scale_power": 16,
        "hysteresis": 2,
        "min_loss_scale": 1,
    },
    "bf16": {"enabled": "auto"},
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "steps_per_print": 1000000,
    "wall_clock_breakdown": False,
}
_ZERO = {
    1: {"stage": 1},
    2: {
        "stage": 2,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "allgather_partitions": True,
        "allgather_bucket_size": 500000000,
        "reduce_scatter": True,
        "reduce_bucket_size": "auto",
    },
    3: {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "sub_group_size": 1000000000,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 1000000000,
        "stage3_max_reuse_distance": 1000000000,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
}


def deepspeed_config(stage: int) -> dict:
    """The DeepSpeed config of ZeRO stage 1, 2 or 3, as shipped in `configuration/deepspeed/zero{stage}.json`."""
    if stage not in _ZERO:
        raise ValueError(f"ZeRO stage must be 1, 2 or 3, got {stage!r}")
    return {**copy.deepcopy(_DEEPSPEED_COMMON), "zero_optimization": copy.deepcopy(_ZERO[stage])}


def _launcher_uses_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _launcher_zero_stage() -> int | None:
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and os.path.isfile(path):
        with open(path) as file:
            return json.load(file).get("zero_optimization", {}).get("stage")
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    return int(stage) if stage else None


def launcher_runs_deepspeed_on_cpu() -> bool:
    """`accelerate launch` brings DeepSpeed, and DeepSpeed runs on the CPU (it found no GPU). Its DeepSpeed launcher
    does not pass the config's `use_cpu: true` on (no `ACCELERATE_USE_CPU`, which every other launcher exports), so
    `TrainingArguments` would look for a GPU, find none and count one process while DeepSpeed runs them all."""
    if not _launcher_uses_deepspeed():
        return False
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def single_process_distributed_env() -> None:
    """DeepSpeed in a plain `python` process: give it the environment a launcher would (else it looks for MPI)."""
    if "WORLD_SIZE" in os.environ or "RANK" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def resolve_deepspeed(config: MagmaTrainingConfig) -> dict | str | None:
    """What `TrainingArguments(deepspeed=...)` gets: the user's, the shipped config of `zero_stage`, or `None` when no
    DeepSpeed is asked for or when `accelerate launch` already brings its own DeepSpeed config (which then wins)."""
    if "deepspeed" in config.training_args:
        return config.training_args["deepspeed"]
    if _launcher_uses_deepspeed():
        accumulation = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "auto")
        if accumulation.isdigit() and int(accumulation) != config.gradient_accumulation_steps:
            raise TrainingConfigError(
                f"The accelerate config sets DeepSpeed's gradient_accumulation_steps: {accumulation}, the training "
                f"config gradient_accumulation_steps: {config.gradient_accumulation_steps}: make them equal"
            )
        launcher_stage = _launcher_zero_stage()
        if config.zero_stage and launcher_stage is not None and launcher_stage != config.zero_stage:
            logger.warning(
                f"zero_stage={config.zero_stage} in the config, but the accelerate launcher configures ZeRO stage "
                f"{launcher_stage}: the launcher's DeepSpeed config is used"
            )
        return None
    if not config.zero_stage:
        return None
    single_process_distributed_env()
    return deepspeed_config(config.zero_stage)


__all__ = ["deepspeed_config", "launcher_runs_deepspeed_on_cpu", "resolve_deepspeed", "single_process_distributed_env"]
