"""Training MAGMA with transformers' `Trainer`: parameter groups, the original's learning-rate schedule, checkpoints of
MAGMA's own weights (each complete or absent), and generated captions at evaluation."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import DeepSpeedSchedulerWrapper
from safetensors.torch import load_file, save_file
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import Trainer
from transformers.integrations.deepspeed import deepspeed_load_checkpoint, is_deepspeed_zero3_enabled
from transformers.trainer import SCHEDULER_NAME, TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy
from transformers.utils import logging

from ..data import MAX_SKIPPED_SHARE, SKIP_EXAMPLES, TooManySkippedError, check_skipped_share
from ..data.streaming import MagmaStream
from ..folders import sync_folder, sync_path
from ..generation import generate_answers
from ..weights_magma import MAGMA_WEIGHTS_NAME, check_state_dict, magma_state_dict
from .collator import EMPTY_KEY, SKIPPED_IMAGES_KEY, SKIPPED_KEY, SKIPPED_REASONS_KEY, MagmaDataCollator

logger = logging.get_logger(__name__)

CAPTIONS_LOG_NAME = "eval_captions.jsonl"
NO_DECAY_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
# A run stops early once its skipped share exceeds the limit beyond chance: Hoeffding's bound at this probability of
# stopping a run whose share is really within it (with nothing decodable: after 42 samples at the default limit of 0.5).
SKIP_CHECK_FALSE_ALARM = 1e-9


# ---------------------------------------------------------------------------------------------------------------------
# Parameter groups


def magma_parameter_groups(
    model: nn.Module, lr: float, image_enc_lr: float | None = None, weight_decay: float = 0.0
) -> list[dict]:
    """Optimizer groups of the trainable parameters only.

    - adapters and image projection (`lr`), image encoder (`image_enc_lr`, default `lr`), as the original's
      `configure_param_groups`;
    - in each, weight decay for weights and none for biases or the parameters of LayerNorm, GroupNorm and BatchNorm.

    Frozen parameters (GPT-J, and the encoder when frozen) are in no group. Each group carries a `"name"`
    (`"adapters_and_projection"` / `"image_encoder"`, `"_no_decay"` appended for the second half); empty groups are
    left out.
    """
    image_enc_lr = lr if image_enc_lr is None else image_enc_lr
    no_decay_names = {
        f"{module_name}.{param_name}" if module_name else param_name
        for module_name, module in model.named_modules()
        if isinstance(module, NO_DECAY_MODULES)
        for param_name, _ in module.named_parameters(recurse=False)
    }
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_encoder = ".vision_tower." in f".{name}"
        no_decay = name in no_decay_names or name.endswith(".bias") or name == "bias"
        key = ("image_encoder" if is_encoder else "adapters_and_projection") + ("_no_decay" if no_decay else "")
        rate, decay = (image_enc_lr if is_encoder else lr), (0.0 if no_decay else weight_decay)
        groups.setdefault(key, {"name": key, "params": [], "lr": rate, "weight_decay": decay})["params"].append(param)
    order = ["adapters_and_projection", "adapters_and_projection_no_decay", "image_encoder", "image_encoder_no_decay"]
    return [groups[key] for key in order if key in groups]


# ---------------------------------------------------------------------------------------------------------------------
# Learning-rate schedule


@dataclass
class MagmaLRSchedule:
    """The original's schedule: DeepSpeed's `WarmupDecayLR` (or `WarmupLR` without `lr_decay_iters`), per group.

    Each group goes from `min_lr` to its own peak (`lr`, `image_enc_lr`) over `warmup_num_steps` steps on a log curve,
    then (with `lr_decay_iters`) linearly back down to `min_lr` at step `lr_decay_iters`, then stays there. As in
    DeepSpeed, the first optimizer step runs at `min_lr` and the step count the curve sees lags one step behind.
    MAGMA_v1/v2 used `lr_decay_iters: 300000` with `train_steps: 150000`: training ends halfway down the slope.
    """

    min_lr: float = 0.0
    warmup_num_steps: int = 100
    lr_decay_iters: int | None = None

    def gamma(self, iteration: int) -> float:
        """DeepSpeed's warm-up / decay factor after `iteration` scheduler steps (`last_batch_iteration`)."""
        warmup = max(2, self.warmup_num_steps)
        if iteration < warmup:
            return math.log(iteration + 1) / math.log(warmup)
        if self.lr_decay_iters is None:
            return 1.0
        return max(0.0, (self.lr_decay_iters - iteration) / max(1.0, self.lr_decay_iters - warmup))

    def lr_at(self, step: int, peak_lr: float) -> float:
        """The learning rate of optimizer step `step + 1` (after `step` completed steps) for a group peaking at
        `peak_lr`."""
        return self.min_lr if step == 0 else self.min_lr + (peak_lr - self.min_lr) * self.gamma(step - 1)

    def scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """A `LambdaLR` following this schedule for every group of `optimizer` (each at its own peak lr)."""

        def factor(peak_lr: float):
            return lambda step: self.lr_at(step, peak_lr) / peak_lr if peak_lr > 0 else 0.0

        return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(group["lr"]) for group in optimizer.param_groups])


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint folders: complete or absent

# A checkpoint is written as `tmp-checkpoint-N/checkpoint-N` and renamed to `checkpoint-N` once every process has
# written its part; a rotated-out one is renamed to `tmp-deleted-checkpoint-N` before it is deleted. Neither name is
# a checkpoint to `Trainer` (`get_last_checkpoint`, `sort_checkpoints`), so a kill leaves nothing a resume would pick.
CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
STAGING_PREFIX = "tmp-"
DELETING_PREFIX = "tmp-deleted-"
INTERRUPTED_NAME = re.compile(rf"^({STAGING_PREFIX}|{DELETING_PREFIX}){PREFIX_CHECKPOINT_DIR}-\d+$")
SUPERSEDED_PREFIX = "superseded-"


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """N for a folder named `checkpoint-N`, else `None`."""
    match = CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why the folder `path` is not a complete checkpoint, or `None` when it is one. `trainer_state.json` is the last
    file a save writes, so a checkpoint that has a readable one has everything else too."""
    state_file = Path(path) / TRAINER_STATE_NAME
    if not Path(path).is_dir():
        return "it is not a folder"
    if not state_file.is_file():
        return f"it has no {TRAINER_STATE_NAME} (a save that was interrupted)"
    try:
        json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"its {TRAINER_STATE_NAME} cannot be read ({error})"
    return None


def checkpoint_folders(folder: str | os.PathLike) -> list[Path]:
    """The `checkpoint-N` folders in `folder`, by step (oldest first)."""
    folder = Path(folder)
    found = [path for path in folder.iterdir() if checkpoint_step(path) is not None] if folder.is_dir() else []
    return sorted((path for path in found if path.is_dir()), key=checkpoint_step)


def last_complete_checkpoint(folder: str | os.PathLike, warn: bool = True) -> str | None:
    """The complete `checkpoint-N` of `folder` with the highest N, or `None`. Incomplete ones after it are skipped,
    each with a warning naming it (`warn`)."""
    for path in reversed(checkpoint_folders(folder)):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        if warn:
            logger.warning(f"Skipping the checkpoint {path}: {problem}. Resuming from an earlier one, if any")
    return None


def require_complete_checkpoint(path: str | os.PathLike) -> None:
    """An error naming `path`, what is wrong with it and the last complete checkpoint beside it, unless complete."""
    problem = checkpoint_problem(path)
    if problem is None:
        return
    earlier = last_complete_checkpoint(Path(path).parent, warn=False)  # named in the error, not resumed from
    beside = f". The last complete checkpoint beside it is {earlier}" if earlier else ""
    raise ValueError(f"Cannot resume from {path}: {problem}{beside}")


# ---------------------------------------------------------------------------------------------------------------------
# Streamed training data: each checkpoint holds where every process's data loader is

DATA_STATE_DIR = "data_state"


class DataStateError(ValueError):
    """A checkpoint whose data-loader state cannot continue this run's stream; the message names what differs."""


def data_state_file(checkpoint: str | os.PathLike, process: int) -> Path:
    """`checkpoint/data_state/process-{process}.json`: that process's `StatefulDataLoader.state_dict()` and the
    layout it was saved with ([`MagmaStream.layout`])."""
    return Path(checkpoint) / DATA_STATE_DIR / f"process-{process}.json"


def read_data_state(checkpoint: str | os.PathLike, process: int, layout: dict) -> dict:
    """The data-loader state of `process` in `checkpoint`, if it was saved with `layout`; else a [`DataStateError`]
    naming what differs, or that the checkpoint has none (a run that did not stream, an older version)."""
    folder = Path(checkpoint) / DATA_STATE_DIR
    files = sorted(folder.glob("process-*.json")) if folder.is_dir() else []
    advice = (
        "Resume with the same processes, dataloader_num_workers, seed and data, or set training_args.ignore_data_skip: "
        "true to read the stream from its beginning"
    )
    if not files:
        raise DataStateError(
            f"Cannot resume the streamed training data from {checkpoint}: it has no {DATA_STATE_DIR}/ (a checkpoint of "
            f"a run whose training data was not streamed, or of an older version), so where the stream stopped is "
            f"unknown. {advice}"
        )
    own = data_state_file(checkpoint, process)
    saved = json.loads((own if own.is_file() else files[0]).read_text(encoding="utf-8"))
    differing = [key for key in layout if saved.get(key) != layout[key]]
    if differing:
        was = ", ".join(f"{key} {saved.get(key)}" for key in differing)
        now = ", ".join(f"{key} {layout[key]}" for key in differing)
        raise DataStateError(
            f"Cannot resume the streamed training data from {checkpoint}: it was saved with {was}, this run has {now}. "
            + advice
        )
    if not own.is_file():
        raise DataStateError(f"Cannot resume the streamed training data from {checkpoint}: {own} is missing")
    return saved["loader"]


def remove_interrupted_saves(folder: str | os.PathLike) -> None:
    """Delete what interrupted checkpoint saves and deletions left in `folder` (`tmp-checkpoint-N`,
    `tmp-deleted-checkpoint-N`: only ever written by this trainer)."""
    folder = Path(folder)
    leftovers = sorted(p for p in folder.iterdir() if INTERRUPTED_NAME.match(p.name)) if folder.is_dir() else []
    for path in leftovers:
        logger.warning(f"Removing {path}: an interrupted checkpoint save or deletion left it")
        shutil.rmtree(path)


def commit_checkpoint(staged: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename the fully written `staged` folder to `final`. A folder already at `final` (a checkpoint of an earlier
    run, or an incomplete one a resume skipped) is kept as `superseded-checkpoint-N` beside it, with a warning."""
    staged, final = Path(staged), Path(final)
    if final.exists():
        kept, n = final.parent / (SUPERSEDED_PREFIX + final.name), 1
        while kept.exists():  # `superseded-checkpoint-N-2`, `-3`, ...: the first that does not exist
            n += 1
            kept = final.parent / f"{SUPERSEDED_PREFIX}{final.name}-{n}"
        os.rename(final, kept)
        logger.warning(f"{final} already existed ({checkpoint_problem(kept) or 'complete'}): kept as {kept}")
    sync_folder(staged)  # on disk before it is named complete: a power loss leaves it whole or absent
    os.rename(staged, final)
    sync_path(final.parent)


def rotate_complete_checkpoints(folder: str | os.PathLike, limit: int | None, keep: set[str]) -> None:
    """`save_total_limit` for complete checkpoints: delete the oldest until `limit` remain, never one in `keep` (the
    one just written, the best one). Incomplete folders are neither counted nor deleted. A deletion renames first, so
    a kill midway leaves `tmp-deleted-checkpoint-N`, never a damaged `checkpoint-N`."""
    if not limit or limit <= 0:
        return
    keep = {str(Path(path)) for path in keep}
    complete = [path for path in checkpoint_folders(folder) if checkpoint_problem(path) is None]
    excess = len(complete) - max(limit, len([path for path in complete if str(path) in keep]))
    for path in [path for path in complete if str(path) not in keep][: max(excess, 0)]:
        logger.info(f"Deleting the older checkpoint {path} (save_total_limit={limit})")
        doomed = path.parent / (DELETING_PREFIX + path.name)
        if doomed.exists():  # an interrupted deletion of the same name: ours
            shutil.rmtree(doomed)
        os.rename(path, doomed)
        shutil.rmtree(doomed)


# ---------------------------------------------------------------------------------------------------------------------
# Trainer


class MagmaTrainer(Trainer):
    """`Trainer` for MAGMA: frozen GPT-J, trained adapters, projection and (optionally) image encoder.

    On top of `Trainer`:

    - on construction it applies MAGMA's training policy to the model
      ([`~MagmaForConditionalGeneration.apply_training_policy`]): a model built or loaded has every parameter
      trainable, as any transformers model;
    - the optimizer (`create_optimizer`) holds only trainable parameters, in [`magma_parameter_groups`]: the image
      encoder at `image_enc_lr`, no weight decay for biases and norms; the optimizer class and its other settings come
      from `TrainingArguments` (`optim`, `adam_beta1/2`, ...);
    - with `lr_schedule`, the original's warm-up/decay ([`MagmaLRSchedule`]) replaces `lr_scheduler_type`;
    - checkpoints hold MAGMA's own weights only (`magma_weights.safetensors`: adapters, projection, image encoder with
      its BatchNorm statistics), not GPT-J's 6B frozen ones; under DeepSpeed its checkpoint also leaves out frozen
      parameters. Resuming rebuilds the model as at the start (same GPT-J source) and loads them back.
      `trainer.save_model()` called directly saves the full model as `Trainer` does;
    - each evaluation also generates captions for a few evaluation images (greedy) and appends them, with the
      reference captions, to `eval_captions.jsonl` in `output_dir` (and logs them at INFO);
    - a [`MagmaStream`] as `train_dataset` (`magma_hf.data.streaming`) is read by a `torchdata` `StatefulDataLoader`
      per process, over that process's share of the stream; every checkpoint holds each process's data-loader state
      (`data_state/process-{rank}.json`), and a resumed run continues the stream there instead of skipping batches
      (another process or worker count, seed or set of shards is an error naming what differs);
    - samples the collator skipped (undecodable images, streamed samples with a `problem`) are counted across workers
      and processes and reported at the end of training (`train_output.metrics["skipped_samples"]`,
      `trainer.total_skipped_samples`). A run that skips more than `max_skipped_share` of its training samples stops
      with a [`TooManySkippedError`] naming the count and the first bad samples: as soon as the samples read so far
      show it beyond chance, else at the end of training (over all processes, before anything else is saved).

    Args (besides `Trainer`'s):
        image_enc_lr (`float`, *optional*): Learning rate of the image encoder; defaults to `args.learning_rate`.
        lr_schedule ([`MagmaLRSchedule`], *optional*): The original's schedule; `None` keeps `lr_scheduler_type`.
        num_caption_samples (`int`, defaults to 2): Evaluation images to caption at each evaluation (0: none).
        caption_max_new_tokens (`int`, defaults to 30): Length limit of those captions.
        run_blind (`bool`, defaults to `False`): Caption blank images (the collator's `blind` for the batches).
        max_skipped_share (`float`, defaults to `magma_hf.data.MAX_SKIPPED_SHARE`, 0.5): The share of training
            samples that may be skipped; 1 never stops.

    The default collator is a [`MagmaDataCollator`] on `processing_class` (a [`MagmaProcessor`]); evaluation batches
    use the first caption of each sample instead of a random one, so that evaluation losses compare.
    """

    def __init__(
        self,
        *args,
        image_enc_lr: float | None = None,
        lr_schedule: MagmaLRSchedule | None = None,
        num_caption_samples: int = 2,
        caption_max_new_tokens: int = 30,
        run_blind: bool = False,
        max_skipped_share: float = MAX_SKIPPED_SHARE,
        **kwargs,
    ):
        model = kwargs.get("model", args[0] if args else None)
        if model is not None:  # MAGMA's training policy: GPT-J frozen, MAGMA's own weights trained
            model.apply_training_policy()
        processor = kwargs.get("processing_class")
        if kwargs.get("data_collator") is None and processor is not None and model is not None:
            kwargs["data_collator"] = MagmaDataCollator(
                processor, max_length=model.config.text_config.n_positions, blind=run_blind
            )
        super().__init__(*args, **kwargs)
        if isinstance(self.data_collator, MagmaDataCollator):
            self.data_collator.report_skips = True
        self.image_enc_lr = image_enc_lr
        self.lr_schedule = lr_schedule
        self.num_caption_samples = num_caption_samples
        self.caption_max_new_tokens = caption_max_new_tokens
        self.run_blind = run_blind
        self.num_skipped_samples = 0  # this process's
        self.total_skipped_samples = 0  # all processes', after train()
        self.max_skipped_share = max_skipped_share
        self.training_samples_read = 0  # this process's training samples, skipped or not (evaluation not counted)
        self.training_samples_skipped = 0
        self.skipped_examples: list[str] = []  # this process's first skipped training images
        self._train_loader: StatefulDataLoader | None = None  # a streamed run's, whose state checkpoints hold
        self._resumed_data_state: dict | None = None

    # ---- optimizer and schedule ----

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            groups = magma_parameter_groups(
                opt_model, self.args.learning_rate, self.image_enc_lr, weight_decay=self.args.weight_decay
            )
            if not groups:
                raise ValueError("The model has no trainable parameter: nothing to optimize")
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            for key in ("params", "model", "optimizer_dict"):
                if key in optimizer_kwargs:
                    raise ValueError(
                        f"optim={self.args.optim!r} builds its own parameter groups, which would drop MAGMA's "
                        "(frozen GPT-J, image encoder learning rate): choose an optimizer such as adamw_torch"
                    )
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_schedule is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        self.lr_scheduler = self.lr_schedule.scheduler(self.optimizer if optimizer is None else optimizer)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # ---- loss ----

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        skipped = int(inputs.pop(SKIPPED_KEY, 0))
        skipped_images = inputs.pop(SKIPPED_IMAGES_KEY, [])
        reasons = inputs.pop(SKIPPED_REASONS_KEY, None)
        self.num_skipped_samples += skipped
        empty = bool(inputs.pop(EMPTY_KEY, False))
        if model.training:
            self._count_training_samples(skipped, 0 if empty else len(inputs["input_ids"]), skipped_images, reasons)
        inputs.setdefault("use_cache", False)  # no KV cache in training
        if not empty:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Every sample of this batch was skipped: run the model anyway (distributed ranks must all run forward and
        # backward) and contribute exactly nothing.
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        loss = outputs.logits.sum() * 0.0
        return (loss, outputs) if return_outputs else loss

    def get_eval_dataloader(self, eval_dataset=None):
        collator = self.data_collator
        if isinstance(collator, MagmaDataCollator):
            self.data_collator = dataclasses.replace(collator, caption_choice="first")  # report_skips too: a field
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = collator

    # ---- streamed training data ----

    def get_train_dataloader(self):
        """`Trainer`'s, except for a [`MagmaStream`]: a `torchdata` `StatefulDataLoader` over this process's part of
        the stream, with the collator and `TrainingArguments`' data-loader settings. Accelerate does not prepare it:
        it would dispatch batches from process 0 or wrap the stream in `IterableDatasetShard`, splitting again a
        stream that is already split over processes and workers. `_prepare_inputs` moves each batch to the device."""
        self._train_loader = None
        if not isinstance(self.train_dataset, MagmaStream):
            return super().get_train_dataloader()
        args = self.args
        stream = self.train_dataset.distribute(args.process_index, args.world_size)
        stream.check_readers(args.dataloader_num_workers)
        self._train_loader = StatefulDataLoader(
            stream,
            batch_size=self._train_batch_size,
            collate_fn=self._get_collator_with_removed_columns(self.data_collator, description="Training"),
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers,
            prefetch_factor=args.dataloader_prefetch_factor,
            multiprocessing_context=args.dataloader_multiprocessing_context,
            in_order=args.dataloader_in_order,
        )
        return self._train_loader

    def get_resumed_dataloader(self, dataloader, num_batches: int):
        """A streamed run continues where its checkpoint's data state says (read by `train`), instead of reading and
        dropping `num_batches` batches."""
        if dataloader is None or dataloader is not self._train_loader:
            return super().get_resumed_dataloader(dataloader, num_batches)
        dataloader.load_state_dict(self._resumed_data_state)
        return dataloader

    def _stream_layout(self) -> dict:
        return self.train_dataset.layout(self.args.world_size, self.args.dataloader_num_workers)

    def _save_data_state(self, checkpoint: str) -> None:
        """This process's data-loader state, after the batches of the steps done, into `checkpoint`."""
        path = data_state_file(checkpoint, self.args.process_index)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"process": self.args.process_index, **self._stream_layout(), "loader": self._train_loader.state_dict()}
        path.write_text(json.dumps(state), encoding="utf-8")

    def _count_training_samples(
        self, skipped: int, kept: int, skipped_images: list[str], reasons: list[str] | None = None
    ) -> None:
        """Count a training batch's samples; stop once the skipped share is clearly over `max_skipped_share`."""
        self.training_samples_read += skipped + kept
        self.training_samples_skipped += skipped
        room = SKIP_EXAMPLES - len(self.skipped_examples)
        reasons = reasons or ["cannot decode or preprocess"] * len(skipped_images)
        self.skipped_examples += [f"{image} ({reason})" for image, reason in zip(skipped_images[:room], reasons)]
        read, skipped = self.training_samples_read, self.training_samples_skipped
        margin = math.sqrt(math.log(1 / SKIP_CHECK_FALSE_ALARM) / (2 * read)) if read else 0.0
        if read and skipped / read - margin > self.max_skipped_share:
            raise TooManySkippedError(
                f"Training stopped after {self.state.global_step} steps: {skipped} of the {read} samples read so far "
                f"(this process) were skipped, more than max_skipped_share {self.max_skipped_share:g}. First: "
                + "; ".join(self.skipped_examples)
                + ". Fix or remove these images, or raise max_skipped_share"
            )

    def _sum_over_processes(self, value: int) -> int:
        count = torch.tensor(value, device=self.args.device)
        return int(self.accelerator.reduce(count, reduction="sum")) if self.args.world_size > 1 else int(count)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint=True` takes the last *complete* checkpoint of `output_dir`
        (incomplete ones are skipped with a warning), a path must be a complete checkpoint (and, for a streamed run,
        hold a data state this run can continue: else a [`DataStateError`] before any work), and what interrupted
        saves left in `output_dir` is removed first. A run that skipped more than `max_skipped_share` of its samples
        stops with an error."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint in {self.args.output_dir} to resume from")
        elif resume_from_checkpoint:
            require_complete_checkpoint(resume_from_checkpoint)
        self._resumed_data_state = None
        if resume_from_checkpoint and isinstance(self.train_dataset, MagmaStream) and not self.args.ignore_data_skip:
            self._resumed_data_state = read_data_state(
                resume_from_checkpoint, self.args.process_index, self._stream_layout()
            )
        if self.args.should_save:
            remove_interrupted_saves(self.args.output_dir)
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        total = self._sum_over_processes(self.num_skipped_samples)
        output.metrics["skipped_samples"] = self.total_skipped_samples = total
        if total and self.is_world_process_zero():
            logger.warning(f"Skipped {total} samples that could not be used (an undecodable image, a streamed problem)")
        check_skipped_share(
            self._sum_over_processes(self.training_samples_skipped),
            self._sum_over_processes(self.training_samples_read),
            self.skipped_examples,
            self.max_skipped_share,
            "Training",
        )
        return output

    # ---- checkpoints: complete or absent ----

    def _point_best_checkpoint_at(self, run_dir: str) -> bool:
        """Trainer looked for the best checkpoint in the staging folder: point `best_model_checkpoint` at the real one
        in `run_dir` (where the one being saved will be once renamed). Returns whether it changed."""
        best_step = self.state.best_global_step
        strategies = (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST)
        if not best_step or self.args.save_strategy not in strategies:
            return False
        best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best_step}")
        if best == self.state.best_model_checkpoint or not (best_step == self.state.global_step or os.path.isdir(best)):
            return False
        self.state.best_model_checkpoint = best
        return True

    # ---- checkpoints: MAGMA's weights only ----

    def magma_weights(self, frozen_too: bool = False) -> dict[str, torch.Tensor]:
        """MAGMA's own weights, complete on the main process (a collective under ZeRO-3: call on every process).
        Under ZeRO-3 a frozen image encoder is gathered only with `frozen_too` (checkpoints need the trained weights
        only; the adapters-only export needs all)."""
        if self.is_deepspeed_enabled and is_deepspeed_zero3_enabled():
            full = self.model_wrapped._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=not frozen_too)
            return magma_state_dict(full or {})
        return magma_state_dict(self.accelerator.unwrap_model(self.model).state_dict())

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints (`_internal_call`) save MAGMA's weights only; a direct call saves the full model, under ZeRO-3
        too (gathered whatever `stage3_gather_16bit_weights_on_model_save` says: without it Trainer would write a
        DeepSpeed checkpoint of every parameter, GPT-J's included, and no model file; `accelerate config` leaves it
        off by default)."""
        if not _internal_call and self.is_deepspeed_enabled and is_deepspeed_zero3_enabled():
            state_dict = self.model_wrapped._zero3_consolidated_16bit_state_dict()  # a collective: every process
            self._save(output_dir or self.args.output_dir, state_dict=state_dict)
            if self.args.push_to_hub:
                self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
            return
        if not _internal_call:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        state_dict = self.magma_weights()
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in state_dict.items()}
        save_file(tensors, os.path.join(output_dir, MAGMA_WEIGHTS_NAME), metadata={"format": "pt"})
        self.accelerator.unwrap_model(self.model).config.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    # ---- overrides of Trainer's private methods ----
    # transformers may change these without notice: tests/training/test_trainer_overrides.py compares each signature
    # with the installed Trainer's and fails naming the method. Checkpoints are staged and renamed (complete or
    # absent); DeepSpeed checkpoints leave the frozen parameters out and resume without them.

    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is saved, Trainer writes it into the staging folder (see `_save_checkpoint`).
        return getattr(self, "_staging_run_dir", None) or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, written as `tmp-checkpoint-N/checkpoint-N` by every process (DeepSpeed's engine writes
        its shards there too, and each process of a streamed run its data-loader state) and renamed to `checkpoint-N`
        when all are done; then `save_total_limit` rotation, which counts and deletes complete checkpoints only and
        never the new one."""
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_run_dir = os.path.join(run_dir, STAGING_PREFIX + name)
        staged, final = os.path.join(staging_run_dir, name), os.path.join(run_dir, name)
        if self.args.should_save and os.path.exists(staging_run_dir):  # a save of this step, interrupted: ours
            shutil.rmtree(staging_run_dir)
        self.accelerator.wait_for_everyone()
        self._staging_run_dir = staging_run_dir
        try:
            super()._save_checkpoint(model, trial)  # its rotation sees the staging folder only: nothing to delete
        finally:
            self._staging_run_dir = None
        if self._train_loader is not None:  # staged with the rest: the checkpoint is complete with it or absent
            self._save_data_state(staged)
        if self._point_best_checkpoint_at(run_dir) and self.args.should_save:
            self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()  # every process's files are in `staged`
        if self.args.should_save:
            commit_checkpoint(staged, final)
            os.rmdir(staging_run_dir)
            keep = {final} | ({self.state.best_model_checkpoint} if self.state.best_model_checkpoint else set())
            rotate_complete_checkpoints(run_dir, self.args.save_total_limit, keep)
        self.accelerator.wait_for_everyone()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        # Trainer leaves frozen parameters out of DeepSpeed's checkpoint for PEFT models only; MAGMA's are frozen too.
        self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        weights_file = os.path.join(resume_from_checkpoint, MAGMA_WEIGHTS_NAME)
        if not os.path.isfile(weights_file):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_magma_weights(self.model if model is None else model, weights_file)

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        if not (self.is_deepspeed_enabled and resume_from_checkpoint is not None):
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        # Trainer resumes DeepSpeed strictly, which fails on a checkpoint without the frozen parameters.
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
        deepspeed_load_checkpoint(self.model_wrapped, resume_from_checkpoint, load_module_strict=False)
        self._load_optimizer_and_scheduler(resume_from_checkpoint)
        self._load_scaler(resume_from_checkpoint)
        return model, train_dataloader

    # ---- evaluation captions ----

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if self.num_caption_samples and dataset is not None and not isinstance(dataset, dict):
            self.log_generated_captions(dataset)
        return metrics

    def log_generated_captions(self, dataset) -> list[str]:
        """Caption the first evaluation images greedily (`magma_hf.generation.generate_answers`: each caption is its
        first line, stripped); append them to `eval_captions.jsonl` on the main process."""
        rows = (dataset[index] for index in range(min(len(dataset), 4 * self.num_caption_samples)))
        with_images = (row for row in rows if row.get("image") is not None)
        samples = list(itertools.islice(with_images, self.num_caption_samples))
        if not samples or self.processing_class is None:
            return []
        model = self.accelerator.unwrap_model(self.model)
        with self.autocast_smart_context_manager():
            captions = generate_answers(
                model,
                self.processing_class,
                [""] * len(samples),  # the image alone: its caption
                [sample["image"] for sample in samples],
                max_new_tokens=self.caption_max_new_tokens,
                blind=self.run_blind,
                synced_gpus=is_deepspeed_zero3_enabled() and self.args.world_size > 1,
            )
        if self.is_world_process_zero():
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, CAPTIONS_LOG_NAME), "a", encoding="utf-8") as file:
                for sample, caption in zip(samples, captions):
                    record = {
                        "step": self.state.global_step,
                        "image_path": sample.get("image_path", ""),
                        "generated": caption,
                        "references": sample["captions"],
                    }
                    file.write(json.dumps(record) + "\n")
                    logger.info(f"step {self.state.global_step}: {caption!r} (reference: {sample['captions'][0]!r})")
        return captions


def load_magma_weights(model: nn.Module, weights_file: str | os.PathLike) -> None:
    """Load a checkpoint's `magma_weights.safetensors` into `model`: every trainable parameter must be in it, and
    nothing of GPT-J."""
    state_dict = load_file(str(weights_file))
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    own = magma_state_dict(model.state_dict())
    check_state_dict(own, state_dict, str(weights_file), required=lambda name: name in trainable)
    model.load_state_dict(state_dict, strict=False)


__all__ = [
    "DataStateError", "MagmaLRSchedule", "MagmaTrainer", "checkpoint_problem", "last_complete_checkpoint",
    "load_magma_weights", "magma_parameter_groups", "read_data_state", "require_complete_checkpoint",
]
