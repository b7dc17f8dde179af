"""Training MAGMA: datasets, the collator, the `Trainer` subclass, the YAML-driven run and the adapter export.

- `data`: image-caption datasets in the original layout, Hub datasets, image folders and img2dataset shards
  (`convert_dataset`, `load_magma_dataset`, ...: import them from `magma_hf`).
- `collator`: rows -> MAGMA's training inputs (`MagmaDataCollator`).
- `trainer`: `MagmaTrainer` (MAGMA-only checkpoints, parameter groups, logged captions) and `MagmaLRSchedule`.
- `run`: `magma-hf train` (`MagmaTrainingConfig`, `train`).
- `export`: the adapter export (`save_adapter_export`, `load_adapter_export`).
"""

import importlib

# Imported on first use, so that `magma_hf.training.data` (the readers) imports without the trainer's dependencies:
# `magma-hf caption --engine vllm` reads its images with it in vLLM's environment (no torchvision, so no open_clip).
_LAZY = {
    "MagmaDataCollator": "collator",
    "load_adapter_export": "export",
    "save_adapter_export": "export",
    "MagmaTrainingConfig": "run",
    "train": "run",
    "MagmaLRSchedule": "trainer",
    "MagmaTrainer": "trainer",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


__all__ = sorted(_LAZY)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
