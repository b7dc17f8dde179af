"""`magma-hf train CONFIG.yml`: train or finetune MAGMA from a YAML config that speaks the original MAGMA's keys.

Launch it as it is (one process), or through `accelerate launch` for several GPUs and DeepSpeed:

```
magma-hf train configuration/train_magma_v1.yml
accelerate launch --config_file configuration/accelerate/deepspeed_zero2.yaml \\
    -m magma_hf train configuration/train_magma_v1.yml
```

Keys after the config file override it: `magma-hf train cfg.yml train_steps=10 training_args.bf16=false`.
See `docs/training.md` for every key.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import itertools
import json
import logging as std_logging
import math
import os
import re
import shutil
import socket
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoConfig, GPTJConfig, TrainingArguments, set_seed
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_utils import IntervalStrategy
from transformers.utils import logging

from ..configuration_magma import normalize_adapter_config
from ..data import (
    MAX_SKIPPED_SHARE,
    TooManySkippedError,
    check_skipped_share,
    load_image_caption_dataset,
    recording_skips,
)
from ..data.decoding import SkipReport
from ..data.streaming import DEFAULT_SHUFFLE_BUFFER_SIZE, MagmaStream, build_stream
from ..factory import (
    DEFAULT_TOKENIZER,
    MODEL_KEYS,
    MagmaSettingsError,
    build_magma_config,
    build_processor,
    encoder_vision_config,
    load_tokenizer,
    model_settings,
    new_model,
)
from ..io_utils import move_files_into
from ..modeling_magma import MagmaForConditionalGeneration
from ..processing_magma import MagmaProcessor, check_processor_matches_model
from ..weights_magma import MAGMA_WEIGHTS_NAME, MODEL_WEIGHTS_FILE, MODEL_WEIGHTS_INDEX_FILE, is_magma_weight
from .collator import MagmaDataCollator
from .export import export_staging_name, save_adapter_export
from .trainer import (
    CAPTIONS_LOG_NAME,
    CHECKPOINT_NAME,
    INTERRUPTED_NAME,
    SUPERSEDED_PREFIX,
    DataStateError,
    MagmaLRSchedule,
    MagmaTrainer,
    checkpoint_folders,
    checkpoint_step,
    last_complete_checkpoint,
    load_magma_weights,
    require_complete_checkpoint,
)

logger = logging.get_logger(__name__)


class TrainingConfigError(ValueError):
    """A training config, or the folders it names, that cannot run as given; the message names the key or folder."""


# ---------------------------------------------------------------------------------------------------------------------
# The config


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
        def positive(name):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TrainingConfigError(f"{name} must be a positive integer, got {value!r}")

        for name in ("batch_size", "train_steps", "gradient_accumulation_steps", "save_every", "eval_every"):
            positive(name)
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
            _check_model_config({k: v for k, v in self.model_config.items() if k not in ("lm_name", "pretrained")})
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


LM_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
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


def _ignored(value):
    return None


# Keys of the original's config that have no effect here (or only one allowed value), accepted so its YAMLs load.
IGNORED_ORIGINAL_KEYS = {
    "train_dataset_name": _ignored,
    "eval_dataset_name": _ignored,
    "dataset_type": _ignored,
    "vqa_dir": _ignored,
    "gqa_dir": _ignored,
    "image_seq_len": _ignored,
    "pretrained_img_encoder": _ignored,
    "fine_tune": _ignored,
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


# ---------------------------------------------------------------------------------------------------------------------
# DeepSpeed

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


def _launcher_runs_deepspeed_on_cpu() -> bool:
    """`accelerate launch` brings DeepSpeed, and DeepSpeed runs on the CPU (it found no GPU). Its DeepSpeed launcher
    does not pass the config's `use_cpu: true` on (no `ACCELERATE_USE_CPU`, which every other launcher exports), so
    `TrainingArguments` would look for a GPU, find none and count one process while DeepSpeed runs them all."""
    if not _launcher_uses_deepspeed():
        return False
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def _single_process_distributed_env() -> None:
    """DeepSpeed in a plain `python` process: give it the environment a launcher would (else it looks for MPI)."""
    if "WORLD_SIZE" in os.environ or "RANK" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(
        {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )


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
    _single_process_distributed_env()
    return deepspeed_config(config.zero_stage)


# ---------------------------------------------------------------------------------------------------------------------
# Model and processor


def _original_settings(config: MagmaTrainingConfig) -> dict[str, Any]:
    """The original's model keys as the config gives them (`None`: not set)."""
    return {key: getattr(config, key) for key in MODEL_KEYS}


def _new_model(config: MagmaTrainingConfig):
    """A new MAGMA: GPT-J weights from `lm_name`, CLIP weights from `pretrained`, random where not given."""
    options = dict(config.model_config)
    lm_name = options.pop("lm_name", None)
    if lm_name is not None and config.lm_name is not None and lm_name != config.lm_name:
        raise TrainingConfigError(f"lm_name is given twice: {config.lm_name!r} and model_config.lm_name {lm_name!r}")
    lm_name = lm_name or config.lm_name
    pretrained = options.pop("pretrained", None)
    _check_model_config(options)
    vision_config = dict(options.pop("vision_config", None) or {})
    if config.image_size is not None:
        vision_config["image_size"] = config.image_size
    try:
        settings = model_settings(_original_settings(config))
        tokenizer = load_tokenizer(config.tokenizer_source or DEFAULT_TOKENIZER)
        language_model_config = AutoConfig.from_pretrained(lm_name).to_dict() if lm_name is not None else None
        magma_config = build_magma_config(
            settings, options.pop("text_config", None), vision_config, tokenizer, language_model_config
        )
        tokenizer.model_max_length = magma_config.text_config.n_positions
        model = new_model(magma_config, lm_name, config.encoder_name, pretrained, config.lm_dtype or "float32")
    except MagmaSettingsError as error:
        raise TrainingConfigError(str(error)) from None
    return model, build_processor(magma_config, tokenizer), lm_name


MODEL_CONFIG_KEYS = ("lm_name", "pretrained", "text_config", "vision_config")
VISION_CONFIG_KEYS = ("layers", "width", "image_size")


def _check_model_config(options: dict) -> None:
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


def _existing_model(config: MagmaTrainingConfig):
    """A MAGMA folder (e.g. a converted checkpoint); architecture keys must agree with it."""
    path = config.model_name_or_path
    model = MagmaForConditionalGeneration.from_pretrained(path, dtype=config.lm_dtype or "auto")
    model_config = model.config
    conflicts = []
    if config.adapter_config is not None:
        if normalize_adapter_config(config.adapter_config) != model_config.adapter_config:
            conflicts.append(f"adapter_config {config.adapter_config} vs {model_config.adapter_config}")
    if config.image_size is not None and config.image_size != model_config.vision_config.image_size:
        conflicts.append(f"image_size {config.image_size} vs {model_config.vision_config.image_size}")
    if config.encoder_name is not None:
        try:
            vision = encoder_vision_config(config.encoder_name)
        except MagmaSettingsError as error:
            raise TrainingConfigError(str(error)) from None
        if (vision["layers"], vision["width"]) != (
            list(model_config.vision_config.layers),
            model_config.vision_config.width,
        ):
            conflicts.append(f"encoder_name {config.encoder_name} vs the model's image encoder")
    if config.use_image_embed_layernorm is not None and (
        config.use_image_embed_layernorm != model_config.use_image_embed_layernorm
    ):
        conflicts.append(f"use_image_embed_layernorm {config.use_image_embed_layernorm}")
    if config.model_config is not None or config.lm_name is not None:
        conflicts.append("model_config / lm_name (they describe a new model)")
    if conflicts:
        raise TrainingConfigError(f"The config does not match the model in {path}: " + "; ".join(conflicts))
    if config.image_embed_dropout_prob is not None:
        model_config.image_embed_dropout_prob = config.image_embed_dropout_prob
        model.multi_modal_projector.dropout.p = config.image_embed_dropout_prob
    if config.freeze_img_encoder is not None:
        model_config.freeze_image_encoder = config.freeze_img_encoder
    model.apply_training_policy()  # loaded with every parameter trainable; a new model gets it from the factory
    try:
        processor = MagmaProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        source = config.tokenizer_source or DEFAULT_TOKENIZER
        logger.warning(f"{path} has no processor files: using the tokenizer {source}")
        try:
            processor = build_processor(model_config, load_tokenizer(source))
        except MagmaSettingsError as error:
            raise TrainingConfigError(str(error)) from None
    check_processor_matches_model(processor, model_config, path)
    return model, processor, _base_language_model(path)


def _base_language_model(path: str) -> str | None:
    info = Path(path) / "magma_export.json"
    if info.is_file():
        return json.loads(info.read_text()).get("base_language_model")
    return None


def build_model_and_processor(config: MagmaTrainingConfig):
    """`(model, processor, base language model name or None)` for the run.

    GPT-J's frozen weights keep the dtype they were loaded in (`lm_dtype`); MAGMA's own weights (adapters, projection,
    image encoder) are float32, the precision the optimizer updates them in (mixed precision is autocast's, or
    DeepSpeed's, which keeps float32 master weights itself). The adapters and the image prefix cast their inputs and
    outputs, so a half-precision GPT-J with float32 MAGMA weights runs without autocast too.
    """
    built = _existing_model(config) if config.model_name_or_path is not None else _new_model(config)
    magma_weights_to_float32(built[0])
    return built


def magma_weights_to_float32(model) -> None:
    """Adapters, projection and image encoder (with its BatchNorm statistics) in float32; GPT-J untouched."""
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if is_magma_weight(name) and tensor.is_floating_point() and tensor.dtype != torch.float32:
            tensor.data = tensor.data.float()


# ---------------------------------------------------------------------------------------------------------------------
# Data


def build_datasets(config: MagmaTrainingConfig, seed: int, eval_samples: int):
    """Training and evaluation datasets.

    Training data that streams (shards, hub datasets, `streaming: true`, or a mix by `train_dataset_weights`) is a
    [`MagmaStream`] seeded with the run's `seed`, endless (each source starts a new reshuffled pass; the run stops at
    `train_steps`); other data is read map-style. Evaluation is `eval_dataset_dir` (a stream's first `eval_samples`
    samples, in order, held in memory), or `eval_dataset_pct` of map-style training data split off (a stream has no
    length to split: no evaluation then). The evaluation set is cut to `eval_samples` (the original evaluated
    `eval_steps` batches). Either one losing more than `max_skipped_share` of its samples while it is read (missing
    images, no captions) is an error naming them."""
    train = _stream(config, "train_dataset_dir", seed=seed, weights=config.train_dataset_weights)
    if train is None:
        train = _load_checked(config.train_dataset_dir, "train_dataset_dir", config)
    if config.eval_dataset_dir is not None:
        stream = _stream(config, "eval_dataset_dir", shuffle_buffer_size=0, repeat=False, pick_caption=False)
        if stream is None:
            evaluation = _load_checked(config.eval_dataset_dir, "eval_dataset_dir", config)
        else:
            evaluation = _first_rows(stream, eval_samples, config)
    elif isinstance(train, MagmaStream):
        logger.info("The training data is streamed and no eval_dataset_dir is given: no evaluation")
        evaluation = None
    elif config.eval_dataset_pct > 0 and len(train) > 1:
        split = train.train_test_split(test_size=config.eval_dataset_pct, seed=seed)
        train, evaluation = split["train"], split["test"]
    else:
        evaluation = None
    if evaluation is not None and len(evaluation) > eval_samples:
        evaluation = evaluation.select(range(eval_samples))
    return train, evaluation


def _stream(config: MagmaTrainingConfig, key: str, **options) -> MagmaStream | None:
    """The stream of `config.<key>`, or `None` when it is read map-style; an error naming `key` when it cannot be."""
    options = {"shuffle_buffer_size": config.shuffle_buffer_size, **options}
    try:
        return build_stream(getattr(config, key), streaming=config.streaming, **options)
    except (ValueError, FileNotFoundError) as error:
        raise TrainingConfigError(f"{key}: {error}") from None


def _first_rows(stream: MagmaStream, count: int, config: MagmaTrainingConfig) -> list[dict]:
    """The first `count` samples of a one-pass `stream` of `eval_dataset_dir`, as a list of rows: a map-style dataset
    that every process evaluates as it would a folder's, held in memory bounded by `count` whatever the size of the
    data. Unusable samples among them are dropped and counted as the map-style readers drop theirs."""
    report, rows = SkipReport("eval_dataset_dir"), []
    for row in itertools.islice(stream, count):
        if row["problem"]:
            report.skip(row["key"], row["problem"])
        else:
            rows.append(row)
    report.summarize(len(rows))
    total = len(rows) + report.skipped
    check_skipped_share(report.skipped, total, report.examples, skipped_share_limit(config), "eval_dataset_dir")
    return rows


def skipped_share_limit(config: MagmaTrainingConfig) -> float:
    return MAX_SKIPPED_SHARE if config.max_skipped_share is None else config.max_skipped_share


def _load_checked(source, key: str, config: MagmaTrainingConfig):
    with recording_skips() as reports:
        dataset = load_image_caption_dataset(source)
    skipped = sum(report.skipped for report in reports)
    examples = [example for report in reports for example in report.examples]
    check_skipped_share(skipped, len(dataset) + skipped, examples, skipped_share_limit(config), key)
    return dataset


# ---------------------------------------------------------------------------------------------------------------------
# TrainingArguments


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def micro_batch_size(config: MagmaTrainingConfig, processes: int) -> int:
    """Per-device batch: `batch_size` is the whole optimizer step's, as DeepSpeed's `train_batch_size` was."""
    per_step = config.gradient_accumulation_steps * processes
    if config.batch_size % per_step:
        raise TrainingConfigError(
            f"batch_size {config.batch_size} is not divisible by gradient_accumulation_steps "
            f"({config.gradient_accumulation_steps}) x processes ({processes})"
        )
    return config.batch_size // per_step


def training_arguments_kwargs(config: MagmaTrainingConfig, processes: int) -> dict:
    """The TrainingArguments of the run: the original keys mapped, then `training_args` on top."""
    micro = micro_batch_size(config, processes)
    kwargs = {
        "output_dir": config.save,
        "max_steps": config.train_steps,
        "per_device_train_batch_size": micro,
        "per_device_eval_batch_size": micro,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "learning_rate": config.lr,
        "weight_decay": config.weight_decay,
        "adam_beta1": 0.9,
        "adam_beta2": 0.95,  # the original's AdamW betas
        "optim": "adamw_torch",
        "max_grad_norm": config.gradient_clipping,
        "logging_steps": config.log_every,
        "logging_first_step": True,
        "save_strategy": "steps",
        "save_steps": config.save_every,
        "eval_strategy": "steps",
        "eval_steps": config.eval_every,
        "prediction_loss_only": True,
        "remove_unused_columns": False,
        "ddp_find_unused_parameters": False,
        "report_to": "none",
        "run_name": config.name,
    }
    if "lr_scheduler_type" in config.training_args:  # Trainer's schedule instead of the original's
        kwargs["warmup_steps"] = config.warmup_num_steps
    kwargs.update({k: v for k, v in config.training_args.items() if k != "deepspeed"})
    if "use_cpu" not in kwargs and _launcher_runs_deepspeed_on_cpu():
        kwargs["use_cpu"] = True
    if kwargs.get("gradient_checkpointing") and "gradient_checkpointing_kwargs" not in kwargs:
        kwargs["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    return kwargs


def resolve_checkpoint(config: MagmaTrainingConfig) -> str | None:
    """The checkpoint in `load`: the folder itself when it is one (it must be complete), else its last complete
    `checkpoint-N` (incomplete ones, left by an interrupted save, are skipped with a warning naming each); `None` when
    there is none yet and `load` is `save` (the original started from step 0 then, so `load` may point at `save` from
    the first run on). Any other `load` without a complete checkpoint is an error naming it: the run would silently
    start afresh."""
    if config.load is None:
        return None
    load = Path(config.load)
    if (load / "trainer_state.json").exists() or checkpoint_step(load) is not None:
        try:
            require_complete_checkpoint(load)
        except ValueError as error:
            raise TrainingConfigError(f"load: {error}") from None
        return str(load)
    if not config.load_optimizer and (load / MAGMA_WEIGHTS_NAME).is_file():
        return str(load)  # only the weights are taken
    is_save = _same_folder(load, config.output_dir)
    if not load.exists() and not is_save:
        raise TrainingConfigError(f"load {load} does not exist")
    if load.exists() and not load.is_dir():
        raise TrainingConfigError(
            f"load {load} is a file: expected a checkpoint folder (checkpoint-N/) or the folder holding them"
        )
    last = last_complete_checkpoint(load) if load.is_dir() else None
    if last is None:
        if not is_save:
            incomplete = [str(path) for path in checkpoint_folders(load)] if load.is_dir() else []
            if incomplete:
                raise TrainingConfigError(
                    f"No complete checkpoint in load={load} to resume from, only incomplete ones: {incomplete}"
                )
            raise TrainingConfigError(
                f"load {load} holds no checkpoint (no checkpoint-N/ folder, no trainer_state.json"
                + ("" if config.load_optimizer else f", no {MAGMA_WEIGHTS_NAME}")
                + "): point it at a checkpoint or at the save folder of the run to resume"
            )
        logger.warning(f"No complete checkpoint in {load} yet: starting from step 0")
    return last


def _same_folder(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _input_folders(config: MagmaTrainingConfig) -> list[tuple[str, str]]:
    """`(key, path)` of the folders the run reads: what it must never write its outputs into."""
    lm_name = config.lm_name or (config.model_config or {}).get("lm_name")
    named = [
        ("model_name_or_path", config.model_name_or_path),
        ("tokenizer_name_or_path", config.tokenizer_source),
        ("lm_name", lm_name),
    ]
    for key in ("train_dataset_dir", "eval_dataset_dir"):
        sources = getattr(config, key)
        for source in sources if isinstance(sources, (list, tuple)) else [sources]:
            named.append((key, source.get("path") if isinstance(source, dict) else source))
    return [(key, str(path)) for key, path in named if isinstance(path, (str, os.PathLike))]


EXPORT_DIR_NAME = "adapter_export"
# What marks a finished run in `save` (Trainer.save_model, the adapter export): named first when refusing the folder.
FINISHED_RUN_FILES = (MODEL_WEIGHTS_FILE, MODEL_WEIGHTS_INDEX_FILE, "config.json", EXPORT_DIR_NAME)


def _listing(entries: list[Path], limit: int = 10) -> str:
    """`a, b/, c and 7 more`: the marks of a finished run first, then the rest by name."""
    rank = {name: index for index, name in enumerate(FINISHED_RUN_FILES)}
    entries = sorted(entries, key=lambda entry: (rank.get(entry.name, len(rank)), entry.name))
    names = [entry.name + ("/" if entry.is_dir() else "") for entry in entries]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_output_dir(config: MagmaTrainingConfig, checkpoint: str | None) -> None:
    """`save` must hold nothing this run could overwrite. It may be new or empty; the run may resume a checkpoint in
    it; `overwrite: true` lets it replace an earlier run's final outputs there. Never: `save` being one of the run's
    inputs, or holding another run's checkpoints (this run would mix its own with them, replace or rotate them away).
    Files the run does not write are never touched."""
    output = Path(config.output_dir).expanduser().resolve()
    for key, path in _input_folders(config):
        if _same_folder(path, output):
            raise TrainingConfigError(
                f"save {output} is also the run's {key}: the trained model would be written over it. Choose "
                "another save folder"
            )
    if output.exists() and not output.is_dir():
        raise TrainingConfigError(f"save {output} is a file, not a folder")
    if checkpoint is not None and config.load_optimizer and Path(checkpoint).resolve().is_relative_to(output):
        return  # the run resumes its own checkpoint: it continues the run that is there
    entries = sorted(output.iterdir()) if output.is_dir() else []
    checkpoints = [entry for entry in entries if entry.is_dir() and CHECKPOINT_NAME.fullmatch(entry.name)]
    # `load: save` with no complete checkpoint yet: this run continues that folder's run from step 0. Its incomplete
    # checkpoints (skipped, never rotated) and the leftovers of its interrupted saves (removed) belong to that run.
    continues_folder = config.load is not None and _same_folder(config.load, output)
    if checkpoints and not continues_folder:
        raise TrainingConfigError(
            f"save {output} holds checkpoints of another run ({_listing(checkpoints)}): this run would mix its "
            f"checkpoints with them and replace them. Resume that run (load: {output}), or choose another save "
            "folder; overwrite: true never replaces checkpoints"
        )
    if continues_folder:  # what that run writes before its first complete checkpoint, or when a save is cut short
        own_names = {CAPTIONS_LOG_NAME, FINAL_MODEL_STAGING, export_staging_name(EXPORT_DIR_NAME)}
        entries = [
            entry
            for entry in entries
            if entry not in checkpoints
            and entry.name not in own_names
            and not INTERRUPTED_NAME.fullmatch(entry.name)
            and not CHECKPOINT_NAME.fullmatch(entry.name.removeprefix(SUPERSEDED_PREFIX))
        ]
    if not entries:
        return
    if not config.overwrite:
        finished = any((output / name).exists() for name in FINISHED_RUN_FILES)
        what = "a finished run" if finished else "files"
        raise TrainingConfigError(
            f"save {output} is not empty: it holds {what} ({_listing(entries)}). Choose another save folder, or set "
            "overwrite: true (magma-hf train --overwrite) to replace a run's outputs there; other files are kept"
        )


# ---------------------------------------------------------------------------------------------------------------------
# The run


def train(config: MagmaTrainingConfig):
    """Train as the config says; returns the trainer. Saves the full model to `save` and the adapters-only export to
    `save/adapter_export` at the end."""
    # The folders first: a run that would overwrite a finished one, or resume nothing, stops before any work.
    checkpoint = resolve_checkpoint(config)
    check_output_dir(config, checkpoint)
    if config.wandb_project:
        os.environ.setdefault("WANDB_PROJECT", config.wandb_project)
    deepspeed = resolve_deepspeed(config)
    processes = world_size()
    # Seed before building: a new model's random weights (GPT-J's too, without lm_name) must be the same when a run is
    # resumed, since checkpoints hold MAGMA's weights only.
    set_seed(config.training_args.get("seed", 42))
    model, processor, base_model = build_model_and_processor(config)
    args = TrainingArguments(**training_arguments_kwargs(config, processes), deepspeed=deepspeed)
    logger.info(
        f"Trainable parameters: {sum(p.numel() for p in model.parameters() if p.requires_grad):,} of "
        f"{sum(p.numel() for p in model.parameters()):,}"
    )

    eval_samples = config.eval_steps * args.per_device_eval_batch_size * processes
    with args.main_process_first(desc="reading the datasets"):
        train_dataset, eval_dataset = build_datasets(config, args.seed, eval_samples)
    if eval_dataset is None:
        args.eval_strategy = IntervalStrategy.NO

    if checkpoint is not None and not config.load_optimizer:
        logger.info(f"Finetuning from the weights of {checkpoint} (load_optimizer: false), from step 0")
        load_magma_weights(model, Path(checkpoint) / MAGMA_WEIGHTS_NAME)
        checkpoint = None

    max_length = config.seq_len or model.config.text_config.n_positions
    if max_length > model.config.text_config.n_positions:
        raise TrainingConfigError(
            f"seq_len {max_length} exceeds the language model's {model.config.text_config.n_positions} positions"
        )
    trainer = MagmaTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        data_collator=MagmaDataCollator(processor, max_length=max_length, blind=config.run_blind),
        image_enc_lr=config.image_enc_lr,
        lr_schedule=None
        if "lr_scheduler_type" in config.training_args
        else MagmaLRSchedule(config.min_lr, config.warmup_num_steps, config.lr_decay_iters),
        num_caption_samples=config.num_caption_samples,
        run_blind=config.run_blind,
        max_skipped_share=skipped_share_limit(config),
    )
    captions_log = Path(args.output_dir) / CAPTIONS_LOG_NAME
    if checkpoint is None and captions_log.is_file() and trainer.is_world_process_zero():
        captions_log.write_text("")  # overwrite: true replaces the earlier run's log; never mix two runs in one
    trainer.train(resume_from_checkpoint=checkpoint)

    save_final_model(trainer, Path(args.output_dir))  # the full model: loads with the Auto classes and the pipeline
    export_dir = Path(args.output_dir) / EXPORT_DIR_NAME
    # Under ZeRO-3 the parameters are shards: MAGMA's are gathered (a collective, on every process). Loading the saved
    # model instead would run ZeRO-3's partitioned init on the main process alone, which waits for the others forever.
    state_dict = trainer.magma_weights(frozen_too=True) if trainer.is_deepspeed_enabled and _is_zero3() else None
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        save_adapter_export(model, export_dir, processor, base_model, state_dict=state_dict)
    trainer.accelerator.wait_for_everyone()
    return trainer


FINAL_MODEL_STAGING = ".final-model.saving"
# The weight files of a saved model: a previous save's that the new one does not write would be loaded instead of it.
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


def save_final_model(trainer, output_dir: Path) -> None:
    """`trainer.save_model` into a hidden folder in `output_dir`, then moved in file by file: a kill midway leaves the
    previous model's files complete (a resumed or overwriting run replaces them only once its own are whole). A
    README.md already there (the user's card, or an earlier run's) is kept; files the save does not write are never
    touched, except an earlier save's weight files that the new one lacks, which would load in its place."""
    staging = output_dir / FINAL_MODEL_STAGING
    if trainer.is_world_process_zero() and staging.exists():
        shutil.rmtree(staging)  # a killed save's leftover: this function's own folder
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))  # a collective under ZeRO-3: every process calls it
    if trainer.is_world_process_zero():
        written = sorted(staging.iterdir())
        indexes = [path for path in written if path.name.endswith(".index.json")]
        keep = {"README.md"} & {path.name for path in output_dir.iterdir()}
        move_files_into([path for path in written if path not in indexes and path.name not in keep], output_dir)
        names = {path.name for path in written}
        for stale in [path for path in output_dir.iterdir() if _WEIGHT_FILE.fullmatch(path.name)]:
            if stale.name not in names:
                stale.unlink()
        move_files_into(indexes, output_dir)  # last: the index names the shards, which are all in place now
        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()


def _is_zero3() -> bool:
    return is_deepspeed_zero3_enabled()


# ---------------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="The training config (YAML): the original MAGMA keys and this package's")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="Override config keys (YAML values; dotted keys reach into mappings, e.g. training_args.bf16=true)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Let the run replace an earlier run's final model, adapter export and captions log in `save` (the "
        "config's overwrite: true); its checkpoints and any other file there are never replaced",
    )


def run(args: argparse.Namespace) -> int:
    std_logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if int(os.environ.get("RANK", "0")) == 0:
        std_logging.getLogger("magma_hf").setLevel(std_logging.INFO)
    overrides = [*args.overrides, *(["overwrite=true"] if args.overwrite else [])]
    try:
        config = MagmaTrainingConfig.from_yaml(args.config, overrides)
        train(config)
    except (TrainingConfigError, TooManySkippedError, DataStateError) as error:  # the user's to fix: one line
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


__all__ = ["MagmaTrainingConfig", "build_model_and_processor", "deepspeed_config", "train"]
