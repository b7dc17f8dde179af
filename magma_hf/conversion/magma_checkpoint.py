"""Convert the released MAGMA checkpoint into a MAGMA model folder (safetensors, processor, Hub code and card).

The released checkpoint (`mp_rank_00_model_states.pt`, about 12 GB, Hub repo `Aleph-Alpha/magma-research`) is a
DeepSpeed model-states file of the original code (github.com/Aleph-Alpha/magma): the weights under `"module"` with the
original module names, beside DeepSpeed's bookkeeping. The conversion reads it (`checkpoint.py`), maps every tensor
to [`MagmaForConditionalGeneration`] or accounts for it (`plan.py`: known buffers and aliases are checked, then
dropped), writes and checks the weights (`weights.py`), and here writes the rest of a folder that loads with
`from_pretrained`, the Auto classes and the `image-to-text` pipeline.

    magma-hf convert --checkpoint Aleph-Alpha/magma-research --output magma-v1
    python -m magma_hf.conversion --checkpoint mp_rank_00_model_states.pt --output magma-v1   # the same

- Safe by default: the pickle is read with `torch.load(weights_only=True, mmap=True)`.
- Memory and time: the checkpoint stays memory-mapped; tensors are written one at a time straight into the shard files
  (copied file to file in the kernel where no cast is needed, as `cp` does), and mapped pages are handed back to the
  kernel once used, so the process holds at most a tensor or two whatever the shard size.
- Nothing is written unless every tensor is accounted for and every written value is finite; the folder is built
  next to `output` and moved into place only when complete (and, with `verify`, checked tensor by tensor against the
  checkpoint). Files in `output` that no conversion wrote (the checkpoint itself, the user's notes or model card) are
  never replaced or deleted; `overwrite` replaces only the files an earlier conversion recorded in
  `magma_conversion.json`. A killed conversion's temporary folder is cleaned up by the next one.

The input embedding is padded from the tokenizer's rows (50258: GPT-2 + `<|image|>`) to the LM head's vocabulary
(50400) with zero rows. No tokenizer id reaches those rows (the original model had none: its embedding stopped at
50258, so looking one up was an index error); zeros are a deterministic, obviously-unused value, whereas copies of
another row would make an unreachable id look like a real token.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from transformers.dynamic_module_utils import custom_object_save, get_relative_import_files
from transformers.utils import CHAT_TEMPLATE_FILE, logging

from .. import configuration_magma, image_processing_magma, modeling_magma, processing_magma
from ..cli import refuse
from ..factory import (
    MagmaSettingsError,
    build_magma_config,
    build_processor,
    empty_model,
    load_tokenizer,
    read_magma_settings,
)
from ..folders import FolderChanges, FolderWriter
from ..hub_magma import saving_as_hub_repo
from ..modeling_magma import MagmaForConditionalGeneration
from ..weights_magma import is_weights_name
from .checkpoint import CHECKPOINT_FILENAME, MagmaConversionError, load_original_checkpoint, resolve_checkpoint
from .plan import plan_conversion
from .safetensors_writer import MappedFile, VerifyReport
from .weights import write_weights

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

logger = logging.get_logger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# Inputs: original YAML, configs, tokenizer (the checkpoint's location: checkpoint.resolve_checkpoint)


@contextmanager
def settings_errors(hint: str = ""):
    """The factory's errors (settings, tokenizer) as the converter's: nothing is written, one line for the CLI."""
    try:
        yield
    except MagmaSettingsError as error:
        raise MagmaConversionError(f"{error}{hint}") from error


def read_json_argument(value: str | os.PathLike | dict | None, what: str) -> dict:
    """A dict, a JSON file or inline JSON (`'{"n_layer": 2}'`)."""
    if value is None or isinstance(value, dict):
        return dict(value or {})
    text = str(value)
    try:
        data = json.loads(text) if text.lstrip().startswith("{") else json.loads(Path(text).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise MagmaConversionError(f"cannot read the {what} {text!r}: {error}") from error
    if not isinstance(data, dict):
        raise MagmaConversionError(f"the {what} {text!r} is not a JSON object")
    return data


# ---------------------------------------------------------------------------------------------------------------------
# Output folder handling: what a conversion writes, what it finds there, staging, installing, interrupted runs

MANIFEST_NAME = "magma_conversion.json"  # what the conversion wrote into the folder: what a later --overwrite replaces
MODEL_CARD_NAME = "README.md"  # a card the user wrote is kept, as `write_model_card` keeps it
# How a conversion writes into `output`: manifest, its temporary folder beside it (`.{output name}.converting-XXXX`,
# locked while it runs), the wording of its errors (`--output out`).
CONVERSION_FOLDER = FolderWriter(
    manifest_name=MANIFEST_NAME,
    written_by="magma_hf.convert_magma_checkpoint",
    note="The files a MAGMA conversion wrote here; a conversion with --overwrite replaces only these.",
    infix=".converting-",
    lock_name="converting.lock",
    error=MagmaConversionError,
    keeps=lambda path: path.name == MODEL_CARD_NAME,  # the user's card is kept, and the conversion's not installed
)


@lru_cache(maxsize=1)
def always_written_names() -> frozenset[str]:
    """Names every conversion writes (the shards aside): the configs, the processor, the code export, the card."""
    code = set()
    for module in (configuration_magma, image_processing_magma, modeling_magma, processing_magma):
        code |= {Path(module.__file__).name, *(Path(file).name for file in get_relative_import_files(module.__file__))}
    configs = {"config.json", "generation_config.json", "processor_config.json", CHAT_TEMPLATE_FILE}
    return frozenset(code) | configs | {"tokenizer.json", "tokenizer_config.json", MODEL_CARD_NAME, MANIFEST_NAME}


def may_be_written(name: str) -> bool:
    """Before the conversion: the names it will surely write (the exact check follows once they are staged)."""
    return name in always_written_names() or is_weights_name(name)


def check_free_space(output: Path, nbytes: int) -> None:
    parent = CONVERSION_FOLDER.parent(output)
    free = shutil.disk_usage(parent).free
    needed = nbytes + 64 * 2**20  # the shards, and room for the configs, tokenizer and code files
    if free < needed:
        raise MagmaConversionError(
            f"not enough space for --output {output}: the conversion writes {needed / 1e9:.2f} GB, {parent} has "
            f"{free / 1e9:.2f} GB free; nothing was written"
        )


def pickle_files(folder: Path) -> list[str]:
    """Files that are pickles: by name, by torch's zip header, or by a pickle header (protocol 2-5) in a file that is
    not safetensors (whose first bytes are the header length, which can look like one)."""
    found = []
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        with open(path, "rb") as stream:
            head = stream.read(4)
        pickle_header = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
        if path.suffix in PICKLE_SUFFIXES or head == b"PK\x03\x04" or (pickle_header and path.suffix != ".safetensors"):
            found.append(str(path.relative_to(folder)))
    return found


# ---------------------------------------------------------------------------------------------------------------------
# The conversion


@dataclass
class ConversionReport:
    output: Path
    checkpoint: Path
    dtype: torch.dtype
    tensors: int
    bytes: int
    shards: list[str]
    dropped_buffers: int
    dropped_aliases: int
    bookkeeping: dict[str, Any]
    verify: VerifyReport | None
    changes: FolderChanges = field(default_factory=FolderChanges)  # what happened to what `output` held before
    recovered: list[str] = field(default_factory=list)  # interrupted conversions cleaned up first
    non_finite: list[str] = field(default_factory=list)  # tensors with NaN/inf, written under `allow_non_finite`

    def __str__(self) -> str:
        keys = ("global_steps", "global_step", "ds_version")
        steps = {key: self.bookkeeping[key] for key in keys if key in self.bookkeeping}
        dtype = str(self.dtype).removeprefix("torch.")
        lines = [
            f"Converted {self.checkpoint}" + (f" ({', '.join(f'{k}={v}' for k, v in steps.items())})" if steps else ""),
            f"  -> {self.output}: {self.tensors} tensors, {self.bytes / 1e9:.3f} GB of {dtype} "
            f"in {len(self.shards)} safetensors file(s)",
            f"  dropped after checking: {self.dropped_buffers} attention buffers (causal mask, masked_bias, "
            f"scale_attn, sin, cos), {self.dropped_aliases} alias keys (word_embedding.*, transformer.*)",
        ]
        if (verify := self.verify) is not None:
            status = "all bitwise equal" if not verify.mismatched else f"{len(verify.mismatched)} DIFFER"
            lines.append(
                f"  verified: {verify.tensors} tensors, {verify.bytes / 1e9:.3f} GB in {verify.shards} file(s) "
                f"reloaded and compared with the checkpoint after the cast: {status} "
                f"(max abs diff {verify.max_abs_diff:g})"
            )
        if self.non_finite:
            lines.append(f"  NOT FINITE (written as they are: allow_non_finite): {len(self.non_finite)} tensors")
            lines += [f"    {problem}" for problem in self.non_finite]
        else:
            lines.append("  every written value is finite (no NaN, no inf, no overflow in the cast)")
        lines += [f"  {line}" for line in self.recovered]
        changes = self.changes
        for what, names in (
            ("replaced (an earlier conversion's)", changes.replaced),
            ("removed (an earlier conversion's, not written this time)", changes.removed),
            ("kept (not written by a conversion)", changes.kept),
        ):
            if names:
                lines.append(f"  {what}: {', '.join(names)}")
        if MODEL_CARD_NAME in changes.kept:
            lines.append(f"  {MODEL_CARD_NAME} is yours and was kept: the conversion's model card was not written")
        return "\n".join(lines)


def resolve_dtype(dtype: str | torch.dtype | None, state_dict: dict[str, torch.Tensor]) -> torch.dtype:
    """`dtype` if given, else the checkpoint's own floating-point dtype (float32 if it mixes several: no rounding)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise MagmaConversionError(f"dtype {dtype} is not one of {list(DTYPES)}")
        return dtype
    if dtype is not None and dtype != "auto":
        if dtype not in DTYPES:
            raise MagmaConversionError(f"dtype {dtype!r} is not one of {list(DTYPES)}")
        return DTYPES[dtype]
    found = {tensor.dtype for tensor in state_dict.values() if tensor.is_floating_point()}
    return found.pop() if len(found) == 1 and found <= set(DTYPES.values()) else torch.float32


def save_model_files(model: MagmaForConditionalGeneration, folder: Path) -> None:
    """The model's files besides its weights (written by `write_weights`), as `model.save_pretrained` writes them with
    the code export on: config.json (with `architectures`, `dtype`, and the Hub export's `auto_map` and
    `custom_pipelines`), the code files `auto_map` names, generation_config.json and the model card (README.md). What
    saving writes into config.json belongs to the saved files: the live config is left as it was."""
    config = model.config
    with saving_as_hub_repo(config, folder, exporting_code=True):  # `auto_map`, `custom_pipelines`, then the card
        config.dtype = str(model.dtype).removeprefix("torch.")
        config.architectures = [type(model).__name__]
        custom_object_save(model, folder, config=config)  # modeling_magma.py, its relative imports, its auto_map entry
        config.save_pretrained(folder)  # config.json, and configuration_magma.py with the AutoConfig entry
        model.generation_config.save_pretrained(folder)  # MAGMA's generation defaults (factory.empty_model sets them)


def convert_magma_checkpoint(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    magma_config: str | os.PathLike | None = None,
    text_config: str | os.PathLike | dict | None = None,
    vision_config: str | os.PathLike | dict | None = None,
    tokenizer: str | os.PathLike | Any = "gpt2",
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "2GB",
    allow_unsafe_pickle: bool = False,
    overwrite: bool = False,
    verify: bool = True,
    allow_non_finite: bool = False,
) -> ConversionReport:
    """Convert an original MAGMA checkpoint into a model folder for [`MagmaForConditionalGeneration`].

    Args:
        checkpoint: `mp_rank_00_model_states.pt`, a folder holding it, or a Hub repo id (`Aleph-Alpha/magma-research`).
        output: The folder to write. An existing folder may hold other files (the checkpoint, notes, your own
            `README.md`): they are kept. Files named like the conversion's that no conversion wrote there stop it.
        magma_config: The original training YAML (adapter_config, encoder_name, use_image_embed_layernorm,
            image_embed_dropout_prob, freeze_img_encoder). Default: MAGMA_v1's settings (`configuration/MAGMA_v1.yml`).
        text_config: `GPTJConfig` fields (dict, JSON file or inline JSON) over GPT-J-6B's.
        vision_config: `{"layers": [...], "width": N, "image_size": N}` fields over the YAML encoder's.
        tokenizer: Name or folder of GPT-2's tokenizer (`<|image|>` is added when absent), or a tokenizer.
        dtype: `"float16"`, `"bfloat16"` or `"float32"`; default: the checkpoint's own.
        max_shard_size: Largest safetensors file (`"2GB"`, or bytes).
        allow_unsafe_pickle: Load with `weights_only=False` (only for files you trust).
        overwrite: Replace the files an earlier conversion wrote into `output` (as its `magma_conversion.json`
            records them, unchanged since), once the new conversion is complete; nothing else is replaced.
        verify: Reload every written tensor and compare it bitwise with its source.
        allow_non_finite: Write tensors holding NaN or inf (from the checkpoint, or from a cast that overflows the
            output dtype) instead of failing; the report names them.

    Returns:
        A [`ConversionReport`]; `str(report)` summarises the conversion and the verification.

    Raises:
        MagmaConversionError: for anything that stops the conversion; `output` is then left as it was.
    """
    output = Path(os.path.abspath(output))  # `--output .` has a name (the folder's), which the staging folder takes
    CONVERSION_FOLDER.check_parent(output)
    recovered = CONVERSION_FOLDER.recover(output)
    CONVERSION_FOLDER.check(output, overwrite, may_be_written)  # fails before any download or reading
    with settings_errors():
        settings = read_magma_settings(magma_config)
    text_overrides = read_json_argument(text_config, "text config")
    vision_overrides = read_json_argument(vision_config, "vision config")
    local_checkpoint = resolve_checkpoint(checkpoint, download=False)  # a wrong path fails before anything else
    with settings_errors(" (--tokenizer)"):
        tokenizer = load_tokenizer(tokenizer)
    checkpoint_path = local_checkpoint or resolve_checkpoint(checkpoint)  # a Hub download only once the rest is fine
    original = load_original_checkpoint(checkpoint_path, allow_unsafe_pickle=allow_unsafe_pickle)
    out_dtype = resolve_dtype(dtype, original.state_dict)
    with settings_errors():
        config = build_magma_config(settings, text_overrides, vision_overrides, tokenizer)
    tokenizer.model_max_length = config.text_config.n_positions  # as the original set it
    model = empty_model(config, out_dtype)
    targets = model.state_dict()
    with MappedFile(checkpoint_path) as pages:
        plan = plan_conversion(original, targets, config, len(tokenizer), pages)
        check_free_space(output, sum(entry.nbytes for entry in plan.entries))
        with CONVERSION_FOLDER.staged(output, overwrite) as (folder, installed):
            save_model_files(model, folder)
            build_processor(config, tokenizer).save_pretrained(folder)
            shards, verified, non_finite = write_weights(
                plan, original, folder, max_shard_size, pages, model.num_parameters(), verify
            )
            if non_finite and not allow_non_finite:
                raise MagmaConversionError(
                    f"{len(non_finite)} tensors would hold values that are not finite (NaN or inf); nothing was "
                    f"moved into {output}:\n  " + "\n  ".join(non_finite) + "\nA checkpoint holding NaN or inf is "
                    "damaged: download it again. Where the cast overflows, choose another --dtype (float32, or "
                    "bfloat16 with float32's range). --allow-non-finite (allow_non_finite=True) writes them as they "
                    "are."
                )
            if verified is not None and verified.mismatched:
                raise MagmaConversionError(
                    f"verification failed: {len(verified.mismatched)} written tensors differ from the checkpoint "
                    f"({verified.mismatched[:5]}...); nothing was moved into {output}"
                )
            if found := pickle_files(folder):
                raise MagmaConversionError(
                    f"the output would hold pickle files {found}; nothing was moved into {output}"
                )
    bookkeeping = {k: v for k, v in original.bookkeeping.items() if isinstance(v, (int, str))}
    return ConversionReport(
        output, checkpoint_path, out_dtype, len(plan.entries), sum(entry.nbytes for entry in plan.entries),
        list(shards), len(plan.dropped_buffers), len(plan.dropped_aliases), bookkeeping, verified, installed[0],
        recovered, non_finite,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Command line: `magma-hf convert ...` and `python -m magma_hf.conversion ...`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    checkpoint_help = f"{CHECKPOINT_FILENAME}, a folder holding it, or a Hub repo id"
    parser.add_argument("--checkpoint", required=True, help=checkpoint_help)
    parser.add_argument(
        "--output", required=True,
        help="folder to write; files in it that no conversion wrote are kept, or (named like the conversion's) stop it",
    )  # fmt: skip
    magma_config_help = "original MAGMA training YAML (default: MAGMA_v1's settings, as configuration/MAGMA_v1.yml)"
    parser.add_argument("--magma-config", help=magma_config_help)
    parser.add_argument("--text-config", help="GPTJConfig fields, JSON file or inline (default GPT-J-6B)")
    vision_config_help = """{"layers": [...], "width": N, "image_size": N} (default: encoder_name's)"""
    parser.add_argument("--vision-config", help=vision_config_help)
    parser.add_argument("--tokenizer", default="gpt2", help="GPT-2 tokenizer name or folder; <|image|> added if absent")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: the checkpoint's own")
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors file (default 2GB)")
    parser.add_argument(
        "--allow-unsafe-pickle", action="store_true",
        help="load with weights_only=False: unpickling can run arbitrary code, only for files you trust",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite", action="store_true",
        help=f"replace the files an earlier conversion wrote into --output (listed in its {MANIFEST_NAME}), once "
        "the new one is complete; nothing else",
    )  # fmt: skip
    parser.add_argument(
        "--allow-non-finite", action="store_true",
        help="write tensors holding NaN or inf (from the checkpoint, or a --dtype cast that overflows) instead of "
        "failing",
    )  # fmt: skip
    parser.add_argument(
        "--verify", action=argparse.BooleanOptionalAction, default=True,
        help="reload every written tensor and compare it bitwise with the checkpoint (default: on)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    max_shard_size = int(args.max_shard_size) if str(args.max_shard_size).isdigit() else args.max_shard_size
    try:  # every option is the parameter of the same name
        report = convert_magma_checkpoint(**{**vars(args), "max_shard_size": max_shard_size})
    except MagmaConversionError as error:
        return refuse(error)
    print(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m magma_hf.conversion", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


__all__ = ["ConversionReport", "MagmaConversionError", "convert_magma_checkpoint"]
