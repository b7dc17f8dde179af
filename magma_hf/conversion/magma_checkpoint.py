"""Convert the released MAGMA checkpoint into a MAGMA model folder (safetensors, processor, Hub code and card).

The released checkpoint (`mp_rank_00_model_states.pt`, about 12 GB, Hub repo `Aleph-Alpha/magma-research`) is a
DeepSpeed model-states file of the original code (github.com/Aleph-Alpha/magma): the weights under `"module"` with the
original module names, beside DeepSpeed's bookkeeping. This module maps every tensor to
[`MagmaForConditionalGeneration`] or accounts for it (known buffers and aliases are checked, then dropped), and writes a
folder that loads with `from_pretrained`, the Auto classes and the `image-to-text` pipeline.

    python conversion/convert_magma_checkpoint.py --checkpoint Aleph-Alpha/magma-research --output magma-v1
    magma-hf convert --checkpoint mp_rank_00_model_states.pt --output magma-v1

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
import math
import os
import re
import shutil
import sys
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.utils import CHAT_TEMPLATE_FILE
from transformers.utils import logging as hf_logging

from .. import configuration_magma, image_processing_magma, modeling_magma, processing_magma
from ..configuration_magma import MagmaConfig
from ..factory import (
    MagmaSettingsError,
    build_magma_config,
    build_processor,
    empty_model,
    load_tokenizer,
    read_magma_settings,
)
from ..folders import FolderChanges, FolderWriter, is_weights_name
from ..modeling_magma import MagmaForConditionalGeneration
from ..weights_magma import LANGUAGE_MODEL_PREFIX, LM_HEAD_PREFIX, PROJECTOR_PREFIX, VISION_TOWER_PREFIX
from .safetensors_writer import (
    FileSlice,
    MappedFile,
    SafetensorsWriteError,
    TensorSpec,
    VerifyReport,
    write_sharded_safetensors,
)

CHECKPOINT_FILENAME = "mp_rank_00_model_states.pt"  # DeepSpeed's model-states file of model-parallel rank 0
# Data-only classes a DeepSpeed-era training script may leave in the bookkeeping entries; unpickling one only sets
# attributes, so weights-only loading may accept them. Anything else needs --allow-unsafe-pickle.
SAFE_BOOKKEEPING_GLOBALS = [argparse.Namespace]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

# Where the original module tree put each part of a block, by adapter type (None: no adapter at that location).
ATTENTION_ROOT = {
    None: "attn",
    "normal": "attn.attn_block",
    "parallel": "attn.module",
    "scaled_parallel": "attn.module",
}
MLP_ROOT = {None: "mlp", "normal": "mlp.0", "parallel": "mlp.module", "scaled_parallel": "mlp.module"}
ADAPTER_ROOT = {
    "attention": {"normal": "attn.adapter", "parallel": "attn.adapter", "scaled_parallel": "attn.adapter"},
    "mlp": {"normal": "mlp.1.adapter", "parallel": "mlp.adapter", "scaled_parallel": "mlp.adapter"},
}
ADAPTER_SCALE = {"attention": "attn.adapter_scale", "mlp": "mlp.adapter_scale"}
GPT_NEO_MLP_NAMES = {"fc_in": "c_fc", "fc_out": "c_proj"}
ATTENTION_BUFFERS = ("bias", "masked_bias", "scale_attn", "sin", "cos")
MASKED_BIAS = -1e9  # the fork's `masked_bias`

logger = hf_logging.get_logger(__name__)


class MagmaConversionError(ValueError):
    """The conversion cannot go on; nothing was written."""


# --------------------------------------------------------------------------------------------------------------------
# Inputs: checkpoint location, original YAML, configs, tokenizer
# --------------------------------------------------------------------------------------------------------------------


def resolve_checkpoint(checkpoint: str | os.PathLike, download: bool = True) -> Path | None:
    """A local file, a folder holding `mp_rank_00_model_states.pt` (directly or under DeepSpeed's `latest` tag), or a
    Hub repo id whose `mp_rank_00_model_states.pt` is downloaded into the Hugging Face cache (with a progress bar).
    With `download=False` a Hub repo id gives `None` (checked, not fetched)."""
    path = Path(checkpoint).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        candidates = [path / CHECKPOINT_FILENAME]
        if (path / "latest").is_file():
            candidates.append(path / (path / "latest").read_text().strip() / CHECKPOINT_FILENAME)
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise MagmaConversionError(f"{path} is a folder without {CHECKPOINT_FILENAME} (looked for {candidates})")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(checkpoint)) or str(checkpoint).startswith((".", "/")):
        raise MagmaConversionError(f"checkpoint {str(checkpoint)!r} is not an existing file, nor a Hub repo id")
    if not download:
        return None
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id=str(checkpoint), filename=CHECKPOINT_FILENAME))
    except Exception as error:  # network, auth, missing repo or file: the user needs the cause, not a traceback
        raise MagmaConversionError(
            f"checkpoint {str(checkpoint)!r} is not a local file, and downloading {CHECKPOINT_FILENAME} from the Hub "
            f"repo {str(checkpoint)!r} failed: {type(error).__name__}: {error}"
        ) from error


@contextmanager
def settings_errors(hint: str = ""):
    """The factory's errors (settings, tokenizer) as the converter's: nothing is written, one line for the CLI."""
    try:
        yield
    except MagmaSettingsError as error:
        raise MagmaConversionError(f"{error}{hint}") from error


def read_json_argument(value: str | os.PathLike | dict | None, what: str) -> dict:
    """A dict, a JSON file or inline JSON (`'{"n_layer": 2}'`)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    text = str(value)
    try:
        data = json.loads(text) if text.lstrip().startswith("{") else json.loads(Path(text).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise MagmaConversionError(f"cannot read the {what} {text!r}: {error}") from error
    if not isinstance(data, dict):
        raise MagmaConversionError(f"the {what} {text!r} is not a JSON object")
    return data


# --------------------------------------------------------------------------------------------------------------------
# Reading the checkpoint
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class OriginalCheckpoint:
    path: Path
    state_dict: dict[str, Any]
    wrapped: bool  # the DeepSpeed dict with "module", or a bare state dict
    bookkeeping: dict[str, Any] = field(default_factory=dict)


def check_zip_archive(path: Path) -> None:
    """`torch.save` writes a zip archive; anything else is a failed download or not a checkpoint at all."""
    size = path.stat().st_size
    if zipfile.is_zipfile(path):
        return
    with open(path, "rb") as stream:
        head = stream.read(512)
    raise MagmaConversionError(f"{path} ({size:,} bytes) is not a torch.save checkpoint: {not_a_checkpoint(head)}")


DOWNLOAD_FAILED = (
    "the download probably failed; download it again (e.g. --checkpoint Aleph-Alpha/magma-research, about 12 GB)"
)


def not_a_checkpoint(head: bytes) -> str:
    """What a file that is not a zip archive is, from its first bytes, and what to do."""
    if not head:
        return f"it is empty: {DOWNLOAD_FAILED}"
    start = head[:60].decode("utf-8", errors="replace").strip()
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        return f"it is an HTML page (starts with {start!r}), a web page saved instead of the file: {DOWNLOAD_FAILED}"
    if head.startswith(b"version https://git-lfs"):
        return (
            "it is a Git LFS pointer (the repository was cloned without git-lfs): run `git lfs pull` in it, or "
            "pass the Hub repo id (--checkpoint Aleph-Alpha/magma-research)"
        )
    if head.startswith(b"PK\x03\x04"):
        return f"it starts like a zip archive but has no central directory: it is truncated; {DOWNLOAD_FAILED}"
    if head[:1] == b"\x80":
        return "it is a pickle in torch's legacy (non-zip) format, which cannot be memory-mapped (torch.save it again)"
    if len(head) >= 10 and head[8:10] == b'{"':
        return (
            "it is a safetensors file, not the original MAGMA checkpoint; a converted model folder loads with "
            "MagmaForConditionalGeneration.from_pretrained"
        )
    if all(32 <= byte < 127 or byte in b"\t\r\n" for byte in head[:200]):
        return f"it is a text file (starts with {start!r}), not the checkpoint: {DOWNLOAD_FAILED}"
    return f"it starts with the bytes {head[:16]!r}, not a zip archive: {DOWNLOAD_FAILED}"


def foreign_state_dict(state_dict: dict[str, Any]) -> str | None:
    """What a state dict without MAGMA's top-level modules (`lm.`, `image_prefix.`) is, in a few words; `None` for a
    MAGMA checkpoint."""
    keys = list(state_dict)
    if any(key.startswith(("lm.", "image_prefix.")) for key in keys):
        return None
    has = set(keys).__contains__
    if any(key.startswith((LANGUAGE_MODEL_PREFIX, VISION_TOWER_PREFIX)) for key in keys):
        return "already a magma_hf model's state dict (a converted folder loads with from_pretrained)"
    if has("transformer.wte.weight") and any(".attn.q_proj." in key for key in keys):
        return "a Hugging Face GPT-J state dict (transformer.h.*): a language model without MAGMA's image prefix"
    if has("transformer.wte.weight") or has("wte.weight"):
        return "a Hugging Face GPT-2/GPT-Neo style language model's state dict, without MAGMA's image prefix"
    if any(key.startswith("visual.") for key in keys):
        return "a CLIP state dict (visual.*)"
    prefixes = sorted({key.split(".", 1)[0] for key in keys})
    return f"a state dict of {len(keys)} entries under {', '.join(prefixes[:5])}{', ...' if len(prefixes) > 5 else ''}"


def load_original_checkpoint(path: str | os.PathLike, allow_unsafe_pickle: bool = False) -> OriginalCheckpoint:
    """Memory-map the checkpoint with `torch.load(weights_only=True, mmap=True)` (or, when the user trusts the file,
    `weights_only=False`) and unwrap DeepSpeed's `"module"` entry."""
    path = Path(path)
    check_zip_archive(path)
    try:
        if allow_unsafe_pickle:
            loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        else:
            with torch.serialization.safe_globals(SAFE_BOOKKEEPING_GLOBALS):
                loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:
        if not allow_unsafe_pickle and "weights only load failed" in str(error).lower():
            raise MagmaConversionError(unsafe_pickle_message(path, error)) from error
        raise MagmaConversionError(
            f"cannot read {path} as a torch checkpoint ({type(error).__name__}: {error}); the file may be truncated "
            f"or damaged: download it again"
        ) from error
    if not isinstance(loaded, dict):
        raise MagmaConversionError(f"{path} holds a {type(loaded).__name__}, not a MAGMA state dict")
    if "module" in loaded:
        state_dict, bookkeeping, wrapped = loaded["module"], {k: v for k, v in loaded.items() if k != "module"}, True
    else:
        state_dict, bookkeeping, wrapped = loaded, {}, False
    if not isinstance(state_dict, dict):
        raise MagmaConversionError(f"{path}: the 'module' entry is a {type(state_dict).__name__}, not a state dict")
    if (what := foreign_state_dict(state_dict)) is not None:
        raise MagmaConversionError(
            f"{path} is not an original MAGMA checkpoint: it is {what}. The converter reads the original release "
            f"({CHECKPOINT_FILENAME} of Aleph-Alpha/magma-research: keys lm.*, image_prefix.*)."
        )
    not_tensors = sorted(key for key, value in state_dict.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        where = "its 'module' entry" if wrapped else "it (no 'module' entry, so read as a bare state dict)"
        raise MagmaConversionError(
            f"{path} is not a MAGMA checkpoint: {where} has {len(not_tensors)} entries that are not tensors: "
            f"{summarize_keys(not_tensors)}"
        )
    return OriginalCheckpoint(path=path, state_dict=state_dict, wrapped=wrapped, bookkeeping=bookkeeping)


def unsafe_pickle_message(path: Path, error: Exception) -> str:
    try:
        with torch.serialization.safe_globals(SAFE_BOOKKEEPING_GLOBALS):
            wanted = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # fall back to the global torch named in its message
        wanted = re.findall(r"GLOBAL ([\w.]+)", str(error))
    return (
        f"{path} needs pickled objects that weights-only loading refuses: {', '.join(wanted) or str(error)}. "
        "Unpickling them can run arbitrary code. If you trust the file (e.g. the official Aleph-Alpha/magma-research "
        "release), pass --allow-unsafe-pickle (allow_unsafe_pickle=True) to load it with weights_only=False."
    )


# --------------------------------------------------------------------------------------------------------------------
# Mapping: original names -> this model's names, known buffers and aliases
# --------------------------------------------------------------------------------------------------------------------


def source_key(target: str, adapter_config: dict) -> str:
    """The original checkpoint's name of this model's state-dict entry `target`.

    `model.language_model.h.3.mlp.base_layer.fc_in.weight` -> `lm.transformer.h.3.mlp.0.c_fc.weight` (MLP adapter
    `normal`), `model.vision_tower.layer1.0.bn1.running_mean` -> `image_prefix.enc.layer1.0.bn1.running_mean`.
    """
    if target.startswith(VISION_TOWER_PREFIX):
        return "image_prefix.enc." + target.removeprefix(VISION_TOWER_PREFIX)
    if target.startswith(PROJECTOR_PREFIX):
        return "image_prefix." + target.removeprefix(PROJECTOR_PREFIX)
    if target.startswith(LM_HEAD_PREFIX):
        return "lm." + target
    name = target.removeprefix(LANGUAGE_MODEL_PREFIX)
    if name == "wte.weight" or name.startswith("ln_f."):
        return "lm.transformer." + name
    block = re.fullmatch(r"h\.(\d+)\.(.+)", name)
    if block is None:
        raise MagmaConversionError(f"the converter does not know where {target!r} comes from")
    prefix, rest = f"lm.transformer.h.{block[1]}.", block[2]
    attention_type = (adapter_config.get("attention") or {}).get("adapter_type")
    mlp_type = (adapter_config.get("mlp") or {}).get("adapter_type")
    if rest.startswith("ln_1."):
        return prefix + rest
    if match := re.fullmatch(r"attn\.(?:base_layer\.)?(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)", rest):
        return f"{prefix}{ATTENTION_ROOT[attention_type]}.attention.{match[1]}.{match[2]}"
    if match := re.fullmatch(r"mlp\.(?:base_layer\.)?(fc_in|fc_out)\.(weight|bias)", rest):
        return f"{prefix}{MLP_ROOT[mlp_type]}.{GPT_NEO_MLP_NAMES[match[1]]}.{match[2]}"
    if match := re.fullmatch(r"(attn|mlp)\.magma_(down|up|norm|scale)\.default(?:\.(weight|bias))?", rest):
        location = "attention" if match[1] == "attn" else "mlp"
        settings = adapter_config[location]
        if match[2] == "scale":
            return prefix + ADAPTER_SCALE[location]
        # nn.Sequential([LayerNorm,] Linear, ReLU, Linear): the LayerNorm shifts the Linear indices by one
        shift = 1 if settings["add_layernorm"] else 0
        index = {"norm": 0, "down": 0 + shift, "up": 2 + shift}[match[2]]
        return f"{prefix}{ADAPTER_ROOT[location][settings['adapter_type']]}.{index}.{match[3]}"
    raise MagmaConversionError(f"the converter does not know where {target!r} comes from")


def attention_buffer_keys(config: MagmaConfig) -> dict[str, str]:
    """The fork's per-block attention buffers (no learned weight): key -> buffer kind."""
    attention_type = (config.adapter_config.get("attention") or {}).get("adapter_type")
    root = ATTENTION_ROOT[attention_type]
    return {
        f"lm.transformer.h.{i}.{root}.attention.{kind}": kind
        for i in range(config.text_config.n_layer)
        for kind in ATTENTION_BUFFERS
    }


def alias_original(key: str) -> str | None:
    """The original name of an alias key: the original registered `word_embedding = lm.transformer.wte` and
    `transformer = lm.transformer.h` on the top-level module, so those tensors are stored twice."""
    if key == "word_embedding.weight":
        return "lm.transformer.wte.weight"
    if match := re.fullmatch(r"transformer\.(\d+)\.(.+)", key):
        return f"lm.transformer.h.{match[1]}.{match[2]}"
    return None


class ExpectedBuffers:
    """What the fork's attention buffers hold (modeling_gpt_neo.py, `jax=True`, rotary)."""

    def __init__(self, config: MagmaConfig):
        text = config.text_config
        self.positions = text.n_positions
        self.head_dim = text.n_embd // text.n_head
        self.rotary_dim = text.rotary_dim or self.head_dim
        self._mask = None
        self._sincos = None

    @property
    def causal_mask(self) -> torch.Tensor:
        if self._mask is None:
            ones = torch.ones(self.positions, self.positions, dtype=torch.bool)
            self._mask = torch.tril(ones).view(1, 1, self.positions, self.positions)
        return self._mask

    @property
    def sincos(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._sincos is None:
            inv_freq = 1.0 / (10000 ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.float64) / self.rotary_dim))
            angles = torch.outer(torch.arange(self.positions, dtype=torch.float64), inv_freq)
            self._sincos = (torch.sin(angles), torch.cos(angles))
        return self._sincos

    def problem(self, kind: str, tensor: torch.Tensor) -> str | None:
        """`None` when the buffer holds what it should, else what is wrong."""
        if kind == "bias":
            expected = self.causal_mask
            if tensor.shape != expected.shape or tensor.dtype not in (torch.bool, torch.uint8):
                return f"expected the causal mask, bool {list(expected.shape)}; got {tensor.dtype} {list(tensor.shape)}"
            return None if torch.equal(tensor.bool(), expected) else "is not the lower-triangular causal mask"
        if not tensor.is_floating_point():
            return f"expected a floating-point tensor, got {tensor.dtype}"
        if kind in ("masked_bias", "scale_attn"):
            value = MASKED_BIAS if kind == "masked_bias" else float(self.head_dim) ** 0.5
            what = "-1e9" if kind == "masked_bias" else f"sqrt(head size {self.head_dim}) = {value:g}"
            expected = torch.tensor(value, dtype=tensor.dtype)  # -1e9 is -inf in float16
            if tensor.numel() != 1 or not torch.equal(tensor.reshape(()), expected):
                return f"expected the scalar {what}; got {tensor.reshape(-1)[:4].tolist()} (shape {list(tensor.shape)})"
            return None
        expected = self.sincos[0 if kind == "sin" else 1]
        if tensor.shape != expected.shape:
            return (
                f"expected the rotary {kind} table [{self.positions} positions, {self.rotary_dim // 2}]; "
                f"got {list(tensor.shape)}"
            )
        tolerance = max(1e-3, 2 * torch.finfo(tensor.dtype).eps)  # float32 rounding differs at large angles
        difference = (tensor.double() - expected).abs().max().item()
        return None if difference <= tolerance else f"is not the rotary {kind} table (max difference {difference:.3g})"


@dataclass
class TensorEntry(TensorSpec):
    """One output tensor (its name here, output shape and dtype) and its source key in the checkpoint."""

    source: str


@dataclass
class ConversionPlan:
    entries: list[TensorEntry]
    dropped_buffers: list[str]
    dropped_aliases: list[str]


def plan_conversion(
    checkpoint: OriginalCheckpoint,
    targets: dict[str, torch.Tensor],
    config: MagmaConfig,
    n_tokens: int,
    pages: MappedFile | None = None,
) -> ConversionPlan:
    """Account for every tensor of the checkpoint, or raise one error listing everything that does not fit.

    Args:
        targets: the output model's state dict (meta tensors in the output dtype), in saving order.
        n_tokens: the tokenizer's size; the checkpoint's input embedding must have a row for each token.
    """
    state_dict = checkpoint.state_dict
    release = pages.release if pages is not None else (lambda *tensors: None)
    problems: dict[str, list[str]] = defaultdict(list)
    entries, used = [], set()
    for name, target in targets.items():
        source = source_key(name, config.adapter_config)
        if source not in state_dict:
            problems["missing"].append(source)
            continue
        used.add(source)
        tensor = state_dict[source]
        entries.append(TensorEntry(name=name, shape=tuple(target.shape), dtype=target.dtype, source=source))
        if name == f"{LANGUAGE_MODEL_PREFIX}wte.weight":
            rows, vocab = tensor.shape[0] if tensor.dim() == 2 else -1, target.shape[0]
            if tensor.dim() != 2 or tensor.shape[1] != target.shape[1] or not n_tokens <= rows <= vocab:
                problems["shape"].append(
                    f"{source}: {list(tensor.shape)}; expected [rows, {target.shape[1]}] with the tokenizer's "
                    f"{n_tokens} <= rows <= the LM head's {vocab}"
                )
        elif tuple(tensor.shape) != tuple(target.shape):
            problems["shape"].append(f"{source}: {list(tensor.shape)}; the configs give {list(target.shape)}")
        if tensor.is_floating_point() != target.is_floating_point():
            problems["dtype"].append(f"{source}: {tensor.dtype}; expected a {target.dtype}-like tensor")

    buffers = attention_buffer_keys(config)
    expected_buffers = ExpectedBuffers(config)
    dropped_buffers = []
    for key, kind in buffers.items():
        if key in state_dict:
            used.add(key)
            dropped_buffers.append(key)
            if (problem := expected_buffers.problem(kind, state_dict[key])) is not None:
                problems["buffer"].append(f"{key} {problem}")
            release(state_dict[key])

    dropped_aliases = []
    for key, tensor in state_dict.items():
        original = alias_original(key)
        if original is None or original not in used:
            continue
        dropped_aliases.append(key)
        if not same_values(tensor, state_dict[original]):
            problems["alias"].append(f"{key} differs from {original}")
        release(tensor, state_dict[original])
    used.update(dropped_aliases)

    problems["unexpected"] = sorted(set(state_dict) - used)
    if any(problems.values()):
        raise MagmaConversionError(mismatch_message(checkpoint, config, problems))
    return ConversionPlan(entries=entries, dropped_buffers=dropped_buffers, dropped_aliases=dropped_aliases)


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality; tensors that are views of the same stored bytes (as torch.save writes aliases) are equal
    without reading them."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    return bitwise_equal(a, b)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equality of the bytes (NaN == NaN, -0 != 0), compared as the widest integers the size allows: comparing 8 bytes
    at a time is about 2.5x faster than 2 at a time."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    x, y = (t.contiguous().reshape(-1).view(torch.uint8) for t in (a, b))
    for dtype in (torch.int64, torch.int32, torch.int16):
        if x.numel() % dtype.itemsize == 0:
            try:
                return torch.equal(x.view(dtype), y.view(dtype))
            except RuntimeError:  # a storage offset that does not divide: try narrower integers
                continue
    return torch.equal(x, y)


def mismatch_message(checkpoint: OriginalCheckpoint, config: MagmaConfig, problems: dict[str, list[str]]) -> str:
    titles = {
        "missing": "missing tensors (the configs need them, the checkpoint has none)",
        "unexpected": "unexpected tensors (neither weights of this model, known buffers nor aliases)",
        "shape": "shapes that disagree with the configs",
        "dtype": "dtypes that disagree",
        "buffer": "buffers that do not hold what they should",
        "alias": "alias keys that differ from their originals",
    }
    lines = [f"{checkpoint.path} does not match the MAGMA model the configs describe; nothing was written."]
    for kind, title in titles.items():
        keys = problems.get(kind)
        if keys:
            listed = summarize_keys(keys) if kind in ("missing", "unexpected") else "\n    ".join(keys)
            lines.append(f"  {len(keys)} {title}:\n    {listed}")
    if problems.get("missing") or problems.get("unexpected"):
        found = detect_adapter_config(checkpoint.state_dict, config.text_config.n_embd)
        if found != config.adapter_config:
            lines.append(
                f"  The checkpoint's adapter keys look like adapter_config {found}, the MAGMA config gives "
                f"{config.adapter_config}: pass the training YAML of this checkpoint as --magma-config."
            )
    return "\n".join(lines)


def summarize_keys(keys: Iterable[str]) -> str:
    """Keys grouped over their first numeric part: `lm.transformer.h.{0-27}.mlp.1.adapter.0.weight`."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    plain = []
    for key in keys:
        match = re.fullmatch(r"(.*?(?:^|\.))(\d+)(\..*|$)", key)
        if match:
            groups[(match[1], match[3])].append(int(match[2]))
        else:
            plain.append(key)
    parts = sorted(plain)
    for (head, tail), indices in sorted(groups.items()):
        indices = sorted(set(indices))
        if len(indices) == 1:
            parts.append(f"{head}{indices[0]}{tail}")
        else:
            parts.append(f"{head}{{{compress_ranges(indices)}}}{tail}")
    return "\n    ".join(parts)


def compress_ranges(indices: list[int]) -> str:
    runs, start = [], indices[0]
    for previous, current in zip(indices, indices[1:] + [None]):
        if current != previous + 1:
            runs.append(str(start) if start == previous else f"{start}-{previous}")
            start = current
    return ",".join(runs)


def detect_adapter_config(state_dict: dict[str, torch.Tensor], hidden_size: int) -> dict:
    """The adapter layout that block 0's keys show (for hints when the configs do not match the checkpoint)."""
    found = {}
    block = "lm.transformer.h.0."
    for location, roots in (("mlp", ("mlp.1.adapter", "mlp.adapter")), ("attention", ("attn.adapter",))):
        for root in roots:
            first = state_dict.get(f"{block}{root}.0.weight")
            if first is None:
                continue
            if location == "mlp":
                parallel = root == "mlp.adapter"
            else:
                parallel = f"{block}attn.attn_block.attention.q_proj.weight" not in state_dict
            adapter_type = "normal"
            if parallel:
                adapter_type = "scaled_parallel" if f"{block}{ADAPTER_SCALE[location]}" in state_dict else "parallel"
            add_layernorm = first.dim() == 1  # a LayerNorm's weight, not a Linear's
            down = state_dict.get(f"{block}{root}.{1 if add_layernorm else 0}.weight")
            factor = hidden_size // down.shape[0] if down is not None and down.dim() == 2 and down.shape[0] else None
            found[location] = {
                "adapter_type": adapter_type,
                "downsample_factor": factor,
                "add_layernorm": add_layernorm,
            }
            break
    return found


# --------------------------------------------------------------------------------------------------------------------
# Writing and verifying
# --------------------------------------------------------------------------------------------------------------------


def output_parts(
    entry: TensorEntry, source: torch.Tensor, locate: Callable[[torch.Tensor], FileSlice | None] = lambda t: None
) -> list[torch.Tensor | FileSlice]:
    """The saved tensor's bytes, in order: the source cast to the output dtype (floating point only; where no cast is
    needed, the source's place in the checkpoint file if `locate` knows it), then, for the input embedding, the zero
    rows that pad it to the LM head's vocabulary."""
    if source.is_floating_point() and source.dtype != entry.dtype:
        first: torch.Tensor | FileSlice = source.to(entry.dtype).contiguous()
    else:
        first = locate(source) or source.contiguous()
    parts = [first]
    rows = source.shape[0] if source.dim() else None
    if tuple(source.shape) != entry.shape:  # only the input embedding (checked in plan_conversion)
        parts.append(torch.zeros((entry.shape[0] - rows, *entry.shape[1:]), dtype=entry.dtype))
    return parts


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf. The sum is finite only if every value is (inf and NaN propagate) and costs about a copy's
    time; a sum that overflows while the values are finite falls back to the exact, slower test."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def non_finite_problem(entry: TensorEntry, written: torch.Tensor, source: torch.Tensor) -> str | None:
    """`None` when every written value is finite; else how many are not, and whether the checkpoint holds them or
    the cast to the output dtype made them (a value beyond the dtype's range becomes inf)."""
    if all_finite(written):
        return None
    bad = int((~torch.isfinite(written)).sum())
    dtype = str(entry.dtype).removeprefix("torch.")
    if all_finite(source):
        return (
            f"{entry.name} ({entry.source}): {bad} values overflow {dtype} in the cast (largest |value| "
            f"{source.abs().max().item():g}; {dtype} holds up to {torch.finfo(entry.dtype).max:g})"
        )
    nan, inf = int(torch.isnan(source).sum()), int(torch.isinf(source).sum())
    return f"{entry.name} ({entry.source}): the checkpoint holds {nan} NaN and {inf} inf values"


def written_difference(entry: TensorEntry, written: torch.Tensor, source: torch.Tensor) -> float | None:
    """`None` when `written` is bitwise what `output_parts` makes of `source`, else the largest absolute difference."""
    if written.dtype != entry.dtype or tuple(written.shape) != entry.shape:
        return math.inf
    expected = source.to(entry.dtype) if source.is_floating_point() else source
    head, padding = written, None
    if tuple(expected.shape) != entry.shape:  # the input embedding: its rows, then zero rows
        head, padding = written[: expected.shape[0]], written[expected.shape[0] :]
    zero_padding = padding is None or not padding.reshape(-1).view(torch.uint8).any()
    if bitwise_equal(head, expected) and zero_padding:
        return None
    difference = 0.0
    flat_head, flat_expected = head.reshape(-1), expected.reshape(-1)
    for start in range(0, flat_head.numel(), 2**24):  # float64 differences, a slice at a time
        piece = flat_head[start : start + 2**24].double() - flat_expected[start : start + 2**24].double()
        difference = max(difference, piece.abs().max().item())
    if padding is not None and padding.numel():
        difference = max(difference, padding.double().abs().max().item())
    return difference


def produce_parts(
    entry: TensorEntry, state_dict: dict, locate: Callable, non_finite: list[str] | None = None
) -> list[torch.Tensor | FileSlice]:
    """The parts `write_safetensors_file` writes; with `non_finite` (when no verification reads them back), their
    values are checked for NaN and inf on the way."""
    source = state_dict[entry.source]
    parts = output_parts(entry, source, locate)
    if non_finite is not None:
        first = parts[0].tensor if isinstance(parts[0], FileSlice) else parts[0]  # the padding rows are zeros
        if problem := non_finite_problem(entry, first, source):
            non_finite.append(problem)
    return parts


def write_weights(
    plan: ConversionPlan,
    checkpoint: OriginalCheckpoint,
    folder: Path,
    max_shard_size: int | str,
    pages: MappedFile,
    total_parameters: int,
    verify: bool,
) -> tuple[dict[str, list[str]], VerifyReport | None, list[str]]:
    """Write the shards (`model-0000i-of-0000n.safetensors` + index, or `model.safetensors`) with the streaming
    writer; returns shard file -> tensor names, the verification report when `verify`, and the tensors whose written
    values are not all finite (checked by the verification, or while writing without it)."""
    state_dict = checkpoint.state_dict
    non_finite: list[str] = []

    def check(entry: TensorEntry, written: torch.Tensor) -> float | None:
        source = state_dict[entry.source]
        difference = written_difference(entry, written, source)
        if problem := non_finite_problem(entry, written, source):
            non_finite.append(problem)
        pages.release(source)
        return difference

    produce = partial(
        produce_parts, state_dict=state_dict, locate=pages.slice_of, non_finite=None if verify else non_finite
    )
    try:
        written = write_sharded_safetensors(
            folder,
            plan.entries,
            produce,
            max_shard_size,
            check=check if verify else None,
            written=lambda entry: pages.release(state_dict[entry.source]),
            total_parameters=total_parameters,
        )
    except SafetensorsWriteError as error:
        raise MagmaConversionError(f"{checkpoint.path}: {error}") from error
    return written.filename_to_tensors, written.verify, non_finite


# --------------------------------------------------------------------------------------------------------------------
# Output folder handling: what a conversion writes, what it finds there, staging, installing, interrupted runs
# --------------------------------------------------------------------------------------------------------------------

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
    return frozenset(code) | {
        "config.json",
        "generation_config.json",
        CHAT_TEMPLATE_FILE,  # the processor's
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        MODEL_CARD_NAME,
        MANIFEST_NAME,
    }


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


# --------------------------------------------------------------------------------------------------------------------
# The conversion
# --------------------------------------------------------------------------------------------------------------------


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
        steps = {
            key: self.bookkeeping[key]
            for key in ("global_steps", "global_step", "ds_version")
            if key in self.bookkeeping
        }
        dtype = str(self.dtype).removeprefix("torch.")
        lines = [
            f"Converted {self.checkpoint}" + (f" ({', '.join(f'{k}={v}' for k, v in steps.items())})" if steps else ""),
            f"  -> {self.output}: {self.tensors} tensors, {self.bytes / 1e9:.3f} GB of {dtype} "
            f"in {len(self.shards)} safetensors file(s)",
            f"  dropped after checking: {self.dropped_buffers} attention buffers (causal mask, masked_bias, "
            f"scale_attn, sin, cos), {self.dropped_aliases} alias keys (word_embedding.*, transformer.*)",
        ]
        if self.verify is not None:
            verify = self.verify
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
    if len(found) == 1:
        (only,) = found
        if only in DTYPES.values():
            return only
    return torch.float32


def save_model_files(model: MagmaForConditionalGeneration, folder: Path) -> None:
    """Everything `model.save_pretrained` writes except the weights (written by `write_weights`): config.json,
    generation_config.json, with the code export on the code files, `auto_map`, `custom_pipelines` and README.md."""
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its shard bar would show 0 shards
    try:
        model.save_pretrained(folder, state_dict={})
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    for path in folder.glob("model*.safetensors*"):
        path.unlink()


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
    return ConversionReport(
        output=output,
        checkpoint=checkpoint_path,
        dtype=out_dtype,
        tensors=len(plan.entries),
        bytes=sum(entry.nbytes for entry in plan.entries),
        shards=list(shards),
        dropped_buffers=len(plan.dropped_buffers),
        dropped_aliases=len(plan.dropped_aliases),
        bookkeeping={k: v for k, v in original.bookkeeping.items() if isinstance(v, (int, str))},
        verify=verified,
        changes=installed[0],
        recovered=recovered,
        non_finite=non_finite,
    )


# --------------------------------------------------------------------------------------------------------------------
# Command line: `magma-hf convert ...` and `python conversion/convert_magma_checkpoint.py ...`
# --------------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help=f"{CHECKPOINT_FILENAME}, a folder holding it, or a Hub repo id"
    )
    parser.add_argument(
        "--output",
        required=True,
        help="folder to write; files in it that no conversion wrote are kept, or (named like the conversion's) stop it",
    )
    parser.add_argument(
        "--magma-config",
        default=None,
        help="original MAGMA training YAML (default: MAGMA_v1's settings, as configuration/MAGMA_v1.yml)",
    )
    parser.add_argument("--text-config", default=None, help="GPTJConfig fields, JSON file or inline (default GPT-J-6B)")
    parser.add_argument(
        "--vision-config",
        default=None,
        help='{"layers": [...], "width": N, "image_size": N} (default: encoder_name\'s)',
    )
    parser.add_argument("--tokenizer", default="gpt2", help="GPT-2 tokenizer name or folder; <|image|> added if absent")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the checkpoint's own")
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors file (default 2GB)")
    parser.add_argument(
        "--allow-unsafe-pickle",
        action="store_true",
        help="load with weights_only=False: unpickling can run arbitrary code, only for files you trust",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace the files an earlier conversion wrote into --output (listed in its {MANIFEST_NAME}), once "
        "the new one is complete; nothing else",
    )
    parser.add_argument(
        "--allow-non-finite",
        action="store_true",
        help="write tensors holding NaN or inf (from the checkpoint, or a --dtype cast that overflows) instead of "
        "failing",
    )
    parser.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reload every written tensor and compare it bitwise with the checkpoint (default: on)",
    )


def run(args: argparse.Namespace) -> int:
    max_shard_size = int(args.max_shard_size) if str(args.max_shard_size).isdigit() else args.max_shard_size
    try:
        report = convert_magma_checkpoint(
            checkpoint=args.checkpoint,
            output=args.output,
            magma_config=args.magma_config,
            text_config=args.text_config,
            vision_config=args.vision_config,
            tokenizer=args.tokenizer,
            dtype=args.dtype,
            max_shard_size=max_shard_size,
            allow_unsafe_pickle=args.allow_unsafe_pickle,
            overwrite=args.overwrite,
            verify=args.verify,
            allow_non_finite=args.allow_non_finite,
        )
    except MagmaConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


__all__ = ["ConversionReport", "MagmaConversionError", "convert_magma_checkpoint"]
