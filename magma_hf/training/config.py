"""The training config: `MagmaTrainingConfig`, its keys and their types, YAML loading and `KEY=VALUE` overrides, and
which `TrainingArguments` settings the config's own keys set.

The original MAGMA's keys (`MultimodalConfig`) plus this package's; `docs/training.md` lists every key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import GPTJConfig, TrainingArguments
from transformers.utils import logging

from ..data import MAX_SKIPPED_SHARE
from ..data.streaming import DEFAULT_SHUFFLE_BUFFER_SIZE

logger = logging.get_logger(__name__)


class TrainingConfigError(ValueError):
    """A training config, or the folders it names, that cannot run as given; the message names the key or folder."""


@dataclass
class MagmaTrainingConfig:
    """A training run. Keys and defaults of the original MAGMA's `MultimodalConfig`, plus this package's own.

    Where a default is `None` and the model already exists (`model_name_or_path`), the model's own setting is kept.
    """

    # the original's training keys
    batch_size: int  # samples per optimizer step, over all processes and accumulation steps (DeepSpeed's)
    train_steps: int  # optimizer steps
    lr: float = 8.0e-4  # adapters and image projection
    image_enc_lr: float | None = None  # image encoder; None: lr
    min_lr: float = 0.0
    lr_decay_iters: int | None = None  # linear decay to min_lr at this step; None: constant after warm-up
    warmup_num_steps: int = 100
    gradient_accumulation_steps: int = 1
    zero_stage: int | None = None  # 1-3: DeepSpeed ZeRO with the shipped config; None/0: no DeepSpeed from here
    gradient_clipping: float = 1.0
    weight_decay: float = 0.0
    run_blind: bool = False
    load_optimizer: bool = True  # False: take only the weights of the checkpoint in `load`, start at step 0
    overwrite: bool = False  # let a new run replace an earlier run's outputs in `save` (never other files)
    # checkpoints and logging
    save: str | None = None
    load: str | None = None
    save_every: int = 2500
    eval_every: int = 250
    eval_steps: int = 25  # evaluation batches per evaluation (the original's meaning, not TrainingArguments')
    log_every: int = 1
    name: str | None = None
    wandb_project: str | None = None
    # data
    train_dataset_dir: Any = None  # a dataset folder, shards (folder of .tar/.parquet, glob, brace range), a source
    eval_dataset_dir: Any = None  # dict, or a list of them
    eval_dataset_pct: float = 0.1  # split off map-style training data when eval_dataset_dir is None
    train_dataset_weights: list | None = None  # sampling probability per train source: a mix, which streams them all
    streaming: bool | None = None  # None: per source (shards and hub datasets stream, folders of files do not)
    shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER_SIZE  # a stream's shuffling window, in samples (0: in order)
    seq_len: int | None = None  # longest sequence, image tokens included; None: the language model's context
    max_skipped_share: float | None = None  # stop when more samples are skipped; None: data.MAX_SKIPPED_SHARE (0.5)
    # model
    encoder_name: str | None = None
    image_size: int | None = None
    freeze_img_encoder: bool | None = None
    adapter_config: dict | None = None
    image_embed_dropout_prob: float | None = None
    use_image_embed_layernorm: bool | None = None
    lm_name: str | None = None
    tokenizer_name: str | None = None  # the original's name for tokenizer_name_or_path
    lm_dtype: str | None = None  # GPT-J's frozen weights: float32/bfloat16/float16; None: as stored (new model: fp32)
    # this package's keys
    model_name_or_path: str | None = None
    model_config: dict | None = None
    tokenizer_name_or_path: str | None = None
    num_caption_samples: int = 2
    training_args: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict) -> MagmaTrainingConfig:
        """Build from a YAML mapping; unknown keys are an error naming them."""
        values = dict(values)
        for key in sorted(set(values) & set(IGNORED_ORIGINAL_KEYS)):
            value = values.pop(key)
            problem = IGNORED_ORIGINAL_KEYS[key](value)
            if problem:
                raise TrainingConfigError(f"Config key {key}: {problem}")
            logger.info(f"Config key {key}={value!r} is the original's and has no effect here")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TrainingConfigError(
                f"Unknown config keys {unknown}. Known keys: {sorted(known)}; TrainingArguments settings go under "
                "training_args:"
            )
        missing = [name for name in ("batch_size", "train_steps") if values.get(name) is None]
        if missing:
            raise TrainingConfigError(f"Config keys {missing} are required")
        values = {key: _typed_value(key, value, CONFIG_TYPES[key]) for key, value in values.items()}
        config = cls(**values)
        config.validate()
        return config

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: list[str] | None = None) -> MagmaTrainingConfig:
        if not Path(path).is_file():
            raise TrainingConfigError(f"Config file {path} does not exist")
        try:
            with open(path, encoding="utf-8") as file:
                values = yaml.safe_load(file) or {}
        except yaml.YAMLError as error:  # names the line and column
            raise TrainingConfigError(f"{path} is not valid YAML: {error}".replace("\n", " ")) from None
        if not isinstance(values, dict):
            raise TrainingConfigError(f"{path} must hold a mapping of config keys, got {type(values).__name__}")
        for override in overrides or []:
            apply_override(values, override)
        return cls.from_dict(values)

    def validate(self) -> None:
        for name in ("batch_size", "train_steps", "gradient_accumulation_steps", "save_every", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TrainingConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.zero_stage not in (None, 0, 1, 2, 3):
            raise TrainingConfigError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if (self.model_name_or_path is None) == (self.model_config is None):
            raise TrainingConfigError(
                "Give exactly one of model_name_or_path (an existing MAGMA folder, e.g. a converted checkpoint) and "
                "model_config (a new model)"
            )
        if self.model_config is not None:
            if not isinstance(self.model_config, dict):
                raise TrainingConfigError(f"model_config must be a mapping, got {type(self.model_config).__name__}")
            check_model_config({k: v for k, v in self.model_config.items() if k not in ("lm_name", "pretrained")})
        if self.train_dataset_dir is None:
            raise TrainingConfigError("train_dataset_dir is required (a dataset folder, or a list of them)")
        if self.save is None and "output_dir" not in self.training_args:
            raise TrainingConfigError("save is required: the folder for checkpoints and the trained model")
        if self.max_skipped_share is not None and not 0 <= self.max_skipped_share <= 1:
            raise TrainingConfigError(f"max_skipped_share must be in [0, 1], got {self.max_skipped_share}")
        if not 0 <= self.eval_dataset_pct < 1:
            raise TrainingConfigError(f"eval_dataset_pct must be in [0, 1), got {self.eval_dataset_pct}")
        if self.shuffle_buffer_size < 0:
            raise TrainingConfigError(
                f"shuffle_buffer_size must be >= 0 (0 reads in order), got {self.shuffle_buffer_size}"
            )
        self._check_train_dataset_weights()
        if not isinstance(self.training_args, dict):
            raise TrainingConfigError(f"training_args must be a mapping, got {type(self.training_args).__name__}")
        taken = sorted(set(self.training_args) & set(TRAINING_ARGS_FROM_KEYS))
        if taken:
            raise TrainingConfigError(
                "Set these through the config's own keys, not training_args: "
                + ", ".join(f"training_args.{k} -> {TRAINING_ARGS_FROM_KEYS[k]}" for k in taken)
            )
        self.training_args = _checked_training_args(self.training_args)
        if self.training_args.get("remove_unused_columns"):
            raise TrainingConfigError(
                "training_args.remove_unused_columns must stay false: the collator needs every column"
            )
        if self.training_args.get("load_best_model_at_end"):
            raise TrainingConfigError(
                "training_args.load_best_model_at_end is not supported (checkpoints hold MAGMA's weights)"
            )
        if self.lm_dtype not in (None, *LM_DTYPES):
            raise TrainingConfigError(f"lm_dtype must be one of {list(LM_DTYPES)}, got {self.lm_dtype!r}")
        if self.tokenizer_name is not None and self.tokenizer_name_or_path is not None:
            raise TrainingConfigError("Give tokenizer_name_or_path or the original's tokenizer_name, not both")

    def _check_train_dataset_weights(self) -> None:
        weights = self.train_dataset_weights
        if weights is None:
            return
        if not isinstance(weights, (list, tuple)):
            raise TrainingConfigError(
                f"train_dataset_weights must be a list of numbers, one per train_dataset_dir source, got {weights!r}"
            )
        weights = [_typed_value(f"train_dataset_weights[{i}]", weight, float) for i, weight in enumerate(weights)]
        sources = self.train_dataset_dir
        count = len(sources) if isinstance(sources, (list, tuple)) else 1
        if len(weights) != count:
            raise TrainingConfigError(
                f"train_dataset_weights has {len(weights)} weights for {count} train_dataset_dir sources: give one "
                "weight per source"
            )
        if any(not math.isfinite(weight) or weight < 0 for weight in weights) or sum(weights) <= 0:
            raise TrainingConfigError(
                f"train_dataset_weights must be non-negative numbers with a positive sum, got {weights}"
            )
        self.train_dataset_weights = weights

    @property
    def tokenizer_source(self) -> str | None:
        return self.tokenizer_name_or_path or self.tokenizer_name

    @property
    def output_dir(self) -> str:
        return self.training_args.get("output_dir") or self.save

    @property
    def skipped_share_limit(self) -> float:
        return MAX_SKIPPED_SHARE if self.max_skipped_share is None else self.max_skipped_share


LM_DTYPES = ("float32", "bfloat16", "float16")
# key -> its annotation (int, float | None, dict, Any, ...), which a YAML value must match
CONFIG_TYPES = typing.get_type_hints(MagmaTrainingConfig)
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}
# What PyYAML reads as a string but is a number: YAML 1.1 wants a dot in a float, so `1e-4` stays "1e-4".
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _typed_value(key: str, value: Any, annotation: Any) -> Any:
    """`value` when it has the type of config key `key` (a float key takes an int, and a number YAML left a string:
    `lr: 1e-4`); else an error naming the key, the type expected and the value given. Annotations other than unions of
    int, float, bool, str, dict and None (enums, `list[str]`, `Any`) are not checked here."""
    allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if not set(allowed) <= {*_TYPE_NAMES, type(None)}:
        return value
    if value is None and type(None) in allowed:
        return value
    for kind in allowed:
        if kind is float and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind in (bool, str, dict) and isinstance(value, kind):
            return value
    expected = " or ".join(_TYPE_NAMES.get(kind, "null") for kind in allowed)
    raise TrainingConfigError(f"Config key {key} must be {expected}, got {value!r} ({type(value).__name__})")


def _checked_training_args(training_args: dict) -> dict:
    """`training_args` keys must be `TrainingArguments` fields, and their values of the field's type: it takes any
    value silently (`bf16: "no"` would turn bf16 on)."""
    fields = typing.get_type_hints(TrainingArguments)
    for key in training_args:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise TrainingConfigError(f"training_args.{key} is not a TrainingArguments setting{hint}")
    return {key: _typed_value(f"training_args.{key}", value, fields[key]) for key, value in training_args.items()}


def _must_be(expected):
    return lambda value: None if value == expected else f"only {expected!r} is supported here, got {value!r}"


# Keys of the original's config that have no effect here (or only one allowed value), accepted so its YAMLs load:
# key -> what is wrong with its value (`None`: nothing).
_NO_EFFECT = ("train_dataset_name", "eval_dataset_name", "dataset_type", "vqa_dir", "gqa_dir", "image_seq_len")
IGNORED_ORIGINAL_KEYS = {
    **dict.fromkeys((*_NO_EFFECT, "pretrained_img_encoder", "fine_tune"), lambda value: None),
    "optimizer_name": _must_be("AdamW"),
    "freeze_lm": _must_be(True),
    "class_dict": _must_be(None),
}
# TrainingArguments fields that the config's own keys set.
TRAINING_ARGS_FROM_KEYS = {
    "max_steps": "train_steps",
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "max_grad_norm": "gradient_clipping",
    "weight_decay": "weight_decay",
    "save_steps": "save_every",
    "eval_steps": "eval_every",
    "logging_steps": "log_every",
    "run_name": "name",
}


def apply_override(values: dict, override: str) -> None:
    """`key=value` (value parsed as YAML); dotted keys reach into mappings: `training_args.bf16=true`."""
    if "=" not in override:
        raise TrainingConfigError(f"Override {override!r} must look like key=value (e.g. train_steps=100)")
    key, raw = override.split("=", 1)
    target = values
    *parents, leaf = key.strip().split(".")
    for parent in parents:
        target = target.setdefault(parent, {})
        if not isinstance(target, dict):
            raise TrainingConfigError(f"Override {override!r}: {parent} is not a mapping")
    target[leaf] = yaml.safe_load(raw)


MODEL_CONFIG_KEYS = ("lm_name", "pretrained", "text_config", "vision_config")
VISION_CONFIG_KEYS = ("layers", "width", "image_size")


def check_model_config(options: dict) -> None:
    """`model_config` keys, and those of its `text_config` / `vision_config`: configs accept any name silently."""
    top_level = sorted(set(options) & {"adapter_config", "image_embed_dropout_prob", "use_image_embed_layernorm"})
    if top_level:
        raise TrainingConfigError(
            f"Set {top_level} at the top level of the config (the original's keys), not in model_config"
        )
    if "image_token_id" in options:
        raise TrainingConfigError(
            "model_config.image_token_id comes from the tokenizer (its <|image|> token); remove it"
        )
    unknown = sorted(set(options) - {"text_config", "vision_config"})
    if unknown:
        raise TrainingConfigError(f"Unknown model_config keys {unknown}; expected {list(MODEL_CONFIG_KEYS)}")
    defaults = GPTJConfig().to_dict()
    unknown = sorted(k for k in options.get("text_config") or {} if k not in defaults)
    if unknown:
        raise TrainingConfigError(f"Unknown model_config.text_config keys {unknown}: not GPTJConfig fields")
    unknown = sorted(set(options.get("vision_config") or {}) - set(VISION_CONFIG_KEYS))
    if unknown:
        raise TrainingConfigError(
            f"Unknown model_config.vision_config keys {unknown}; expected {list(VISION_CONFIG_KEYS)}"
        )


__all__ = [
    "CONFIG_TYPES", "IGNORED_ORIGINAL_KEYS", "LM_DTYPES", "MODEL_CONFIG_KEYS", "TRAINING_ARGS_FROM_KEYS",
    "VISION_CONFIG_KEYS", "MagmaTrainingConfig", "TrainingConfigError", "apply_override", "check_model_config",
]
