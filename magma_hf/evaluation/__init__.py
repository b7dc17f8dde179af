"""Evaluating MAGMA zero- and few-shot on VQAv2, OK-VQA, GQA and captioning, with the official metrics.

- `data`: evaluation sets (Hub datasets, local files, the original layout) and few-shot support draws.
- `run`: `magma-hf eval` (`evaluate`, resumable results logs).
- `vqa_metrics`, `caption_metrics`: VQA accuracy and answer normalisation; BLEU and CIDEr-D.
"""

from .data import EvalSet, load_eval_set
from .run import evaluate, load_model_and_processor

__all__ = ["EvalSet", "evaluate", "load_eval_set", "load_model_and_processor"]
