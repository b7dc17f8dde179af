"""Training MAGMA: the collator, the `Trainer` subclass, the YAML-driven run and the adapter export.

- `collator`: rows -> MAGMA's training inputs (`MagmaDataCollator`).
- `trainer`: `MagmaTrainer` (MAGMA-only checkpoints, parameter groups, logged captions) and `MagmaLRSchedule`.
- `config`: the training config (`MagmaTrainingConfig`): keys, types, YAML and overrides.
- `deepspeed`: the shipped ZeRO configs and which one a run gets.
- `run`: `magma-hf train` (`train`): model, data, `TrainingArguments`, folder checks, the run.
- `export`: the adapter export (`save_adapter_export`, `load_adapter_export`).

The data readers are `magma_hf.data`.
"""

from .collator import MagmaDataCollator
from .config import MagmaTrainingConfig
from .export import load_adapter_export, save_adapter_export
from .run import train
from .trainer import MagmaLRSchedule, MagmaTrainer

__all__ = [
    "MagmaDataCollator", "MagmaLRSchedule", "MagmaTrainer", "MagmaTrainingConfig", "load_adapter_export",
    "save_adapter_export", "train",
]
