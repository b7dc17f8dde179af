"""Training MAGMA: datasets, the collator, the `Trainer` subclass, the YAML-driven run and the adapter export.

- `data`: image-caption datasets in the original layout, Hub datasets, image folders and img2dataset shards.
- `collator`: rows -> MAGMA's training inputs (`MagmaDataCollator`).
- `trainer`: `MagmaTrainer` (MAGMA-only checkpoints, parameter groups, logged captions) and `MagmaLRSchedule`.
- `run`: `magma-hf train` (`MagmaTrainingConfig`, `train`).
- `export`: the adapter export (`save_adapter_export`, `load_adapter_export`).
"""

from .collator import MagmaDataCollator
from .data import (
    convert_dataset,
    from_hf_dataset,
    iter_img2dataset,
    load_image_caption_dataset,
    load_imagefolder,
    load_img2dataset,
    load_magma_dataset,
)
from .export import load_adapter_export, save_adapter_export
from .run import MagmaTrainingConfig, train
from .trainer import MagmaLRSchedule, MagmaTrainer

__all__ = [
    "MagmaDataCollator",
    "MagmaLRSchedule",
    "MagmaTrainer",
    "MagmaTrainingConfig",
    "convert_dataset",
    "from_hf_dataset",
    "iter_img2dataset",
    "load_adapter_export",
    "load_image_caption_dataset",
    "load_imagefolder",
    "load_img2dataset",
    "load_magma_dataset",
    "save_adapter_export",
    "train",
]
