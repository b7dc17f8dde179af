"""The released MAGMA checkpoint as the converter reads it: found (a file, a DeepSpeed folder, or a Hub repo id whose
`mp_rank_00_model_states.pt` is downloaded), checked to be a `torch.save` archive of a MAGMA state dict, and
memory-mapped with `torch.load(weights_only=True, mmap=True)`; what a file that is not one is, in one line.
"""

from __future__ import annotations

import argparse
import os
import re
import zipfile
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import huggingface_hub
import torch

from ..weights_magma import LANGUAGE_MODEL_PREFIX, VISION_TOWER_PREFIX

CHECKPOINT_FILENAME = "mp_rank_00_model_states.pt"  # DeepSpeed's model-states file of model-parallel rank 0
# Data-only classes a DeepSpeed-era training script may leave in the bookkeeping entries; unpickling one only sets
# attributes, so weights-only loading may accept them. Anything else needs --allow-unsafe-pickle.
SAFE_BOOKKEEPING_GLOBALS = [argparse.Namespace]


class MagmaConversionError(ValueError):
    """The conversion cannot go on; nothing was written."""


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
        if found := next((candidate for candidate in candidates if candidate.is_file()), None):
            return found
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
    wrapped = "module" in loaded
    state_dict = loaded["module"] if wrapped else loaded
    bookkeeping = {k: v for k, v in loaded.items() if k != "module"} if wrapped else {}
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
        middle = str(indices[0]) if len(indices) == 1 else f"{{{compress_ranges(indices)}}}"
        parts.append(f"{head}{middle}{tail}")
    return "\n    ".join(parts)


def compress_ranges(indices: list[int]) -> str:
    runs, start = [], indices[0]
    for previous, current in zip(indices, indices[1:] + [None]):
        if current != previous + 1:
            runs.append(str(start) if start == previous else f"{start}-{previous}")
            start = current
    return ",".join(runs)
