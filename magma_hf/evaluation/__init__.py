"""Evaluating MAGMA zero- and few-shot on VQAv2, OK-VQA, GQA and captioning, with the official metrics.

- `data`: evaluation sets (Hub datasets, local files, the original layout) and few-shot support draws.
- `prompts`: the prompts of evaluation and captioning, and their generation budgets.
- `run`: `magma-hf eval` (`evaluate`: the evaluation's identity and records in the resumable job of `magma_hf.jobs`).
- `vqa_metrics`, `caption_metrics`: VQA accuracy and answer normalisation; BLEU and CIDEr-D.
"""

from ..jobs import load_model_and_processor
from .data import EvalSet, load_eval_set
from .run import evaluate

__all__ = ["EvalSet", "evaluate", "load_eval_set", "load_model_and_processor"]
