"""Training MAGMA: the collator, the `Trainer` subclass, the YAML-driven run and the adapter export.

- `collator`: rows -> MAGMA's training inputs (`MagmaDataCollator`).
- `trainer`: `MagmaTrainer` (MAGMA-only checkpoints, parameter groups, logged captions) and `MagmaLRSchedule`.
- `run`: `magma-hf train` (`MagmaTrainingConfig`, `train`).
- `export`: the adapter export (`save_adapter_export`, `load_adapter_export`).

The data readers are `magma_hf.data`.
"""

from .collator import MagmaDataCollator
from .export import load_adapter_export, save_adapter_export
from .run import MagmaTrainingConfig, train
from .trainer import MagmaLRSchedule, MagmaTrainer

__all__ = [
    "MagmaDataCollator",
    "MagmaLRSchedule",
    "MagmaTrainer",
    "MagmaTrainingConfig",
    "load_adapter_export",
    "save_adapter_export",
    "train",
]
