"""`magma-hf train CONFIG.yml`: train or finetune MAGMA from a YAML config that speaks the original MAGMA's keys.

Launch it as it is (one process), or through `accelerate launch` for several GPUs and DeepSpeed:

```
magma-hf train configuration/train_magma_v1.yml
accelerate launch --config_file configuration/accelerate/deepspeed_zero2.yaml \\
    -m magma_hf train configuration/train_magma_v1.yml
```

Keys after the config file override it: `magma-hf train cfg.yml train_steps=10 training_args.bf16=false`.
See `docs/training.md` for every key.

The config is `training.config`, DeepSpeed `training.deepspeed`; this module builds the model, the data and the
`TrainingArguments`, checks the folders, runs and saves.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging as std_logging
import os
from pathlib import Path

import torch
from transformers import AutoConfig, TrainingArguments, set_seed
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_utils import IntervalStrategy
from transformers.utils import logging

from ..cli import refuse
from ..configuration_magma import normalize_adapter_config
from ..data import (
    TooManySkippedError,
    check_skipped_share,
    load_image_caption_dataset,
    recording_skips,
)
from ..data.decoding import SkipReport
from ..data.streaming import MagmaStream, build_stream
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
from ..folders import FolderWriter
from ..modeling_magma import MagmaForConditionalGeneration
from ..processing_magma import MagmaProcessor, check_processor_matches_model
from ..weights_magma import (
    IMAGE_PREFIX_FILE,
    MAGMA_WEIGHTS_NAME,
    MODEL_WEIGHTS_FILE,
    MODEL_WEIGHTS_INDEX_FILE,
    is_magma_weight,
    is_weights_name,
)
from .collator import MagmaDataCollator
from .config import MagmaTrainingConfig, TrainingConfigError, check_model_config
from .deepspeed import deepspeed_config, launcher_runs_deepspeed_on_cpu, resolve_deepspeed
from .export import EXPORT_FOLDER, export_staging_name, recorded_base_language_model, save_adapter_export
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


# ---------------------------------------------------------------------------------------------------------------------
# Model and processor


@contextlib.contextmanager
def _config_error(*kinds: type[Exception], prefix: str = ""):
    """An error of `kinds` raised in the block becomes a `TrainingConfigError` with its message: one line to fix."""
    try:
        yield
    except kinds as error:
        raise TrainingConfigError(prefix + str(error)) from None


def _new_model(config: MagmaTrainingConfig):
    """A new MAGMA: GPT-J weights from `lm_name`, CLIP weights from `pretrained`, random where not given."""
    options = dict(config.model_config)
    lm_name = options.pop("lm_name", None)
    if lm_name is not None and config.lm_name is not None and lm_name != config.lm_name:
        raise TrainingConfigError(f"lm_name is given twice: {config.lm_name!r} and model_config.lm_name {lm_name!r}")
    lm_name = lm_name or config.lm_name
    pretrained = options.pop("pretrained", None)
    check_model_config(options)
    vision_config = dict(options.pop("vision_config", None) or {})
    if config.image_size is not None:
        vision_config["image_size"] = config.image_size
    with _config_error(MagmaSettingsError):
        settings = model_settings({key: getattr(config, key) for key in MODEL_KEYS})  # the original's keys
        tokenizer = load_tokenizer(config.tokenizer_source or DEFAULT_TOKENIZER)
        language_model_config = AutoConfig.from_pretrained(lm_name).to_dict() if lm_name is not None else None
        magma_config = build_magma_config(
            settings, options.pop("text_config", None), vision_config, tokenizer, language_model_config
        )
        tokenizer.model_max_length = magma_config.text_config.n_positions
        model = new_model(magma_config, lm_name, config.encoder_name, pretrained, config.lm_dtype or "float32")
    return model, build_processor(magma_config, tokenizer), lm_name


def _existing_model(config: MagmaTrainingConfig):
    """A MAGMA folder (e.g. a converted checkpoint); architecture keys must agree with it."""
    path = config.model_name_or_path
    model = MagmaForConditionalGeneration.from_pretrained(path, dtype=config.lm_dtype or "auto")
    model_config = model.config
    vision_config, conflicts = model_config.vision_config, []
    if config.adapter_config is not None:
        with _config_error(ValueError):  # the config's key, named in one line like every other bad key
            adapter_config = normalize_adapter_config(config.adapter_config)
        if adapter_config != model_config.adapter_config:
            conflicts.append(f"adapter_config {config.adapter_config} vs {model_config.adapter_config}")
    if config.image_size is not None and config.image_size != vision_config.image_size:
        conflicts.append(f"image_size {config.image_size} vs {vision_config.image_size}")
    if config.encoder_name is not None:
        with _config_error(MagmaSettingsError):
            vision = encoder_vision_config(config.encoder_name)
        if (vision["layers"], vision["width"]) != (list(vision_config.layers), vision_config.width):
            conflicts.append(f"encoder_name {config.encoder_name} vs the model's image encoder")
    if config.use_image_embed_layernorm not in (None, model_config.use_image_embed_layernorm):
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
        with _config_error(MagmaSettingsError):
            processor = build_processor(model_config, load_tokenizer(source))
    check_processor_matches_model(processor, model_config, path)
    return model, processor, recorded_base_language_model(path)


def build_model_and_processor(config: MagmaTrainingConfig):
    """`(model, processor, base language model name or None)` for the run.

    GPT-J's frozen weights keep the dtype they were loaded in (`lm_dtype`); MAGMA's own weights (adapters, projection,
    image encoder) are float32, the precision the optimizer updates them in (mixed precision is autocast's, or
    DeepSpeed's, which keeps float32 master weights itself). The adapters and the image prefix cast their inputs and
    outputs, so a half-precision GPT-J with float32 MAGMA weights runs without autocast too.
    """
    built = _existing_model(config) if config.model_name_or_path is not None else _new_model(config)
    # the image encoder's BatchNorm statistics too
    for name, tensor in itertools.chain(built[0].named_parameters(), built[0].named_buffers()):
        if is_magma_weight(name) and tensor.is_floating_point() and tensor.dtype != torch.float32:
            tensor.data = tensor.data.float()
    return built


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
    evaluation = None
    if config.eval_dataset_dir is not None:
        stream = _stream(config, "eval_dataset_dir", shuffle_buffer_size=0, repeat=False, pick_caption=False)
        if stream is None:
            evaluation = _load_checked(config.eval_dataset_dir, "eval_dataset_dir", config)
        else:
            evaluation = _first_rows(stream, eval_samples, config)
    elif isinstance(train, MagmaStream):
        logger.info("The training data is streamed and no eval_dataset_dir is given: no evaluation")
    elif config.eval_dataset_pct > 0 and len(train) > 1:
        split = train.train_test_split(test_size=config.eval_dataset_pct, seed=seed)
        train, evaluation = split["train"], split["test"]
    if evaluation is not None and len(evaluation) > eval_samples:
        evaluation = evaluation.select(range(eval_samples))
    return train, evaluation


def _stream(config: MagmaTrainingConfig, key: str, **options) -> MagmaStream | None:
    """The stream of `config.<key>`, or `None` when it is read map-style; an error naming `key` when it cannot be."""
    options = {"shuffle_buffer_size": config.shuffle_buffer_size, **options}
    with _config_error(ValueError, FileNotFoundError, prefix=f"{key}: "):
        return build_stream(getattr(config, key), streaming=config.streaming, **options)


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
    check_skipped_share(report.skipped, total, report.examples, config.skipped_share_limit, "eval_dataset_dir")
    return rows


def _load_checked(source, key: str, config: MagmaTrainingConfig):
    with recording_skips() as reports:
        dataset = load_image_caption_dataset(source)
    skipped = sum(report.skipped for report in reports)
    examples = [example for report in reports for example in report.examples]
    check_skipped_share(skipped, len(dataset) + skipped, examples, config.skipped_share_limit, key)
    return dataset


# ---------------------------------------------------------------------------------------------------------------------
# TrainingArguments


def training_arguments_kwargs(config: MagmaTrainingConfig, processes: int) -> dict:
    """The TrainingArguments of the run: the original keys mapped, then `training_args` on top."""
    # the per-device batch: `batch_size` is the whole optimizer step's, as DeepSpeed's `train_batch_size` was
    per_step = config.gradient_accumulation_steps * processes
    if config.batch_size % per_step:
        raise TrainingConfigError(
            f"batch_size {config.batch_size} is not divisible by gradient_accumulation_steps "
            f"({config.gradient_accumulation_steps}) x processes ({processes})"
        )
    micro = config.batch_size // per_step
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
    if "use_cpu" not in kwargs and launcher_runs_deepspeed_on_cpu():
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
        with _config_error(ValueError, prefix="load: "):
            require_complete_checkpoint(load)
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
    named = [("model_name_or_path", config.model_name_or_path), ("tokenizer_name_or_path", config.tokenizer_source)]
    named.append(("lm_name", config.lm_name or (config.model_config or {}).get("lm_name")))
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
    check_final_outputs(output)
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
        entries = [  # its checkpoints, complete or not, are named `[superseded-]checkpoint-N`
            entry
            for entry in entries
            if entry.name not in own_names and not INTERRUPTED_NAME.fullmatch(entry.name)
            and not CHECKPOINT_NAME.fullmatch(entry.name.removeprefix(SUPERSEDED_PREFIX))
        ]
    if not entries:
        return
    if not config.overwrite:
        what = "a finished run" if any((output / name).exists() for name in FINISHED_RUN_FILES) else "files"
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
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    # Seed before building: a new model's random weights (GPT-J's too, without lm_name) must be the same when a run is
    # resumed, since checkpoints hold MAGMA's weights only.
    set_seed(config.training_args.get("seed", 42))
    model, processor, base_model = build_model_and_processor(config)
    args = TrainingArguments(**training_arguments_kwargs(config, processes), deepspeed=deepspeed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"Trainable parameters: {trainable:,} of {sum(p.numel() for p in model.parameters()):,}")

    eval_samples = config.eval_steps * args.per_device_eval_batch_size * processes
    with args.main_process_first(desc="reading the datasets"):
        train_dataset, eval_dataset = build_datasets(config, args.seed, eval_samples)
    if eval_dataset is None:
        args.eval_strategy = IntervalStrategy.NO

    if checkpoint is not None and not config.load_optimizer:
        logger.info(f"Finetuning from the weights of {checkpoint} (load_optimizer: false), from step 0")
        load_magma_weights(model, Path(checkpoint) / MAGMA_WEIGHTS_NAME)
        checkpoint = None

    positions = model.config.text_config.n_positions
    max_length = config.seq_len or positions
    if max_length > positions:
        raise TrainingConfigError(f"seq_len {max_length} exceeds the language model's {positions} positions")
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
        max_skipped_share=config.skipped_share_limit,
    )
    output = Path(args.output_dir)
    captions_log = output / CAPTIONS_LOG_NAME
    if checkpoint is None and captions_log.is_file() and trainer.is_world_process_zero():
        captions_log.write_text("")  # overwrite: true replaces the earlier run's log; never mix two runs in one
    trainer.train(resume_from_checkpoint=checkpoint)

    save_final_model(trainer, output)  # the full model: loads with the Auto classes and the pipeline
    # Under ZeRO-3 the parameters are shards: MAGMA's are gathered (a collective, on every process). Loading the saved
    # model instead would run ZeRO-3's partitioned init on the main process alone, which waits for the others forever.
    zero3 = trainer.is_deepspeed_enabled and is_deepspeed_zero3_enabled()
    state_dict = trainer.magma_weights(frozen_too=True) if zero3 else None
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        save_adapter_export(model, output / EXPORT_DIR_NAME, processor, base_model, state_dict=state_dict)
    trainer.accelerator.wait_for_everyone()
    return trainer


FINAL_MODEL_STAGING = ".final-model.saving"
# How the final model is written into `save`, which also holds the run's checkpoints and export: staged in
# `save/.final-model.saving` (one fixed name, which every process finds), recorded in `magma_model.json`, moved in.
FINAL_MODEL_FOLDER = FolderWriter(
    manifest_name="magma_model.json",
    written_by="magma_hf.training.run.save_final_model",
    note="The files the final model save of `magma-hf train` wrote here; a later run replaces only these, while "
    "unchanged.",
    infix=FINAL_MODEL_STAGING,
    lock_name="saving.lock",
    error=FileExistsError,
    noun="final model save",
    label="save",
    overwrite_flag="",
    keeps=lambda path: path.name == "README.md",
    inside=True,
)


def check_final_outputs(output: Path) -> None:
    """Before the run: the final model's and the export's main files in `save` are a run's (their manifests list them,
    unchanged), or absent. Else (the user's, or an older version's that recorded nothing) the saves at the end would
    stop on them: named now, before any training."""
    model_files = (FINAL_MODEL_FOLDER, output, lambda name: name == "config.json" or is_weights_name(name))
    export_files = (EXPORT_FOLDER, output / EXPORT_DIR_NAME, lambda name: name in (IMAGE_PREFIX_FILE, "config.json"))
    for writer, folder, writes in (model_files, export_files):
        with _config_error(FileExistsError):
            writer.check(folder, overwrite=True, writes=writes)


def save_final_model(trainer, output_dir: Path) -> None:
    """`trainer.save_model` into a hidden folder in `output_dir`, then moved in (folders.FolderWriter): a kill midway
    leaves the previous model's files complete (a resumed or overwriting run replaces them only once its own are
    whole). An earlier save's files (its `magma_model.json` lists them) are replaced, and those the new one lacks
    (weight files that would load in its place) removed; the user's README.md is kept; other files are never touched,
    and a user's file named like one the save writes stops it."""
    main = trainer.is_world_process_zero()
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        FINAL_MODEL_FOLDER.recover(output_dir)  # a killed save's leftover: this function's own folder
    staging = output_dir / FINAL_MODEL_STAGING / output_dir.name  # what `FINAL_MODEL_FOLDER.workspace` makes
    with FINAL_MODEL_FOLDER.workspace(output_dir) if main else contextlib.nullcontext():
        trainer.accelerator.wait_for_everyone()  # the staging folder exists
        trainer.save_model(str(staging))  # a collective under ZeRO-3: every process calls it
        if main:
            FINAL_MODEL_FOLDER.install(staging, output_dir, overwrite=True)
    trainer.accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="The training config (YAML): the original MAGMA keys and this package's")
    overrides = "Override config keys (YAML values; dotted keys reach into mappings, e.g. training_args.bf16=true)"
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=overrides)
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
        train(MagmaTrainingConfig.from_yaml(args.config, overrides))
    except (TrainingConfigError, TooManySkippedError, DataStateError) as error:  # the user's to fix: one line
        return refuse(error)
    return 0


__all__ = ["MagmaTrainingConfig", "build_model_and_processor", "deepspeed_config", "train"]
