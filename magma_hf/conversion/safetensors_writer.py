"""Streaming writer of sharded safetensors files: tensors by name, as slices of a memory-mapped file or as tensors,
into `model-0000i-of-0000n.safetensors` + index (or `model.safetensors`) as `save_pretrained` names them, each shard
fsynced and, optionally, read back and checked while the next one is written.

Nothing here knows the model being written: the caller says which tensors go out (`TensorSpec`: name, shape, dtype),
how to produce each one's bytes (`produce`), and how to compare a tensor read back from its shard (`check`). The
caller also provides the folder, which should be a staged one (moved into place once complete), since a shard is
written in place under its final name.

Why the header is written by hand rather than with `safetensors.torch.save_file` per shard: `save_file` needs every
tensor of the shard in memory at once (2 GB shards, materialised from the memory map; their pages stay resident until
the shard is written), while this writer holds one tensor at a time and copies slices that need no cast file to file
in the kernel (`os.copy_file_range`). Measured once on the full-size synthetic MAGMA checkpoint (12.99 GB, 7 shards of
2 GB, verification on; `tests/benchmarks/bench_conversion.py --also-save-file`, see conversion/README.md): this writer
77.1 s, peak RSS 1.90 GB; `save_file` per shard 79.2 s, peak RSS 3.29 GB, above the 3 GB target (the copy took
61.0 s on that shared disk, so both meet the 2x-copy time target).
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import struct
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from transformers.utils import logging as hf_logging

from ..folders import sync_path, write_text_atomically
from ..weights_magma import MODEL_WEIGHTS_FILE, MODEL_WEIGHTS_INDEX_FILE

SAFETENSORS_DTYPES = {
    torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
VERIFY_GROUP_BYTES = 256 * 2**20  # a shard is reopened after this many bytes: closing releases its mapped pages


class SafetensorsWriteError(ValueError):
    """A shard could not be written as asked (the source file ended early, a part of the wrong size or dtype)."""


@dataclass
class TensorSpec:
    """One tensor to write: its name in the file, its shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class FileSlice:
    """The bytes of a source tensor, where they lie in a file (open as `fd`)."""

    tensor: torch.Tensor
    fd: int
    offset: int

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


Part = torch.Tensor | FileSlice  # what `produce` returns, in order, for one tensor


class MappedFile:
    """A memory-mapped file (as `torch.load(mmap=True)` maps it): where a tensor's bytes lie in it, and handing its
    pages back to the kernel.

    - `slice_of(tensor)` gives the file offset of a tensor that views the mapping, so that its bytes can go file to
      file with `os.copy_file_range`, as `cp` does: no page faults, no copy through this process.
    - Every page read through the mapping stays resident, and counted in the process's RSS, until unmapped: reading
      a 12 GB file would grow the process by 12 GB. `release(tensors)` drops their pages with `madvise(DONTNEED)`;
      a later access reads them from the file again (the mapping is private and never written).

    Both act only on this file's mapping as /proc/self/maps lists it (Linux); elsewhere they do nothing and tensors are
    read through the mapping.
    """

    MADV_DONTNEED = 4

    def __init__(self, path: Path):
        self.fd: int | None = None
        self._madvise = None
        self._ranges = self._mapped_ranges(os.path.realpath(path))
        if not self._ranges or not sys.platform.startswith("linux"):
            return
        fd = os.open(path, os.O_RDONLY)
        if any(inode != os.fstat(fd).st_ino for *_, inode in self._ranges):  # not the file that was mapped
            os.close(fd)
            self._ranges = []
            return
        self.fd = fd
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            self._madvise = libc.madvise
        except (OSError, AttributeError):
            self._madvise = None

    @staticmethod
    def _mapped_ranges(real_path: str) -> list[tuple[int, int, int, int]]:
        """(start address, end address, file offset, inode) of each mapping of the file."""
        try:
            lines = Path("/proc/self/maps").read_text().splitlines()
        except OSError:
            return []
        ranges = []
        for line in lines:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5] == real_path:
                start, end = (int(address, 16) for address in fields[0].split("-"))
                ranges.append((start, end, int(fields[2], 16), int(fields[4])))
        return ranges

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> MappedFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def slice_of(self, tensor: torch.Tensor) -> FileSlice | None:
        """Where a contiguous tensor that views the mapping lies in the file (`None` for any other tensor)."""
        if self.fd is None or not tensor.is_contiguous():
            return None
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        for low, high, offset, _ in self._ranges:
            if low <= start and end <= high:
                return FileSlice(tensor, self.fd, offset + start - low)
        return None

    def release(self, *tensors: torch.Tensor) -> None:
        if self._madvise is None:
            return
        for tensor in tensors:
            storage = tensor.untyped_storage()
            start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
            for low, high, _, _ in self._ranges:  # both ends page-aligned
                begin = max(start, low) // mmap.PAGESIZE * mmap.PAGESIZE
                stop = min(-(-min(end, high) // mmap.PAGESIZE) * mmap.PAGESIZE, high)
                if begin < stop:
                    self._madvise(begin, stop - begin, self.MADV_DONTNEED)


def copy_file_slice(part: FileSlice, stream) -> bool:
    """Append the slice to `stream` with `os.copy_file_range` (in the kernel); `False` where that is not possible."""
    copy = getattr(os, "copy_file_range", None)
    if copy is None:
        return False
    stream.flush()
    done = 0
    while done < part.nbytes:
        try:
            copied = copy(part.fd, stream.fileno(), part.nbytes - done, part.offset + done)
        except OSError:
            if done == 0:
                return False  # e.g. another file system on an old kernel: write it instead
            raise
        if copied == 0:
            raise SafetensorsWriteError(f"the source file ended inside a tensor (offset {part.offset + done})")
        done += copied
    return True


def part_tensor(part: Part) -> torch.Tensor:
    return part.tensor if isinstance(part, FileSlice) else part


def safetensors_header(specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The file's first bytes: the header's length, then the header (shapes, dtypes, offsets), padded to 8 bytes."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": SAFETENSORS_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
    return struct.pack("<Q", len(blob)) + blob


def write_safetensors_file(
    path: Path,
    specs: list[TensorSpec],
    produce: Callable[[TensorSpec], list[Part]],
    done: Callable[[TensorSpec], None] = lambda spec: None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file tensor by tensor: the header first (all shapes and dtypes are known), then the bytes
    of each tensor's parts as `produce` returns them (slices of a file are copied in the kernel), so at most one
    tensor is in memory at a time; `done(spec)` follows each tensor. The file reads back with `safetensors.safe_open`.
    """
    if sys.byteorder != "little":
        raise SafetensorsWriteError("safetensors files are little-endian; this machine is big-endian")
    with open(path, "xb") as stream:  # never over a file that exists: it is not this writer's
        stream.write(safetensors_header(specs, metadata))
        for spec in specs:
            parts = produce(spec)
            tensors = [part_tensor(part) for part in parts]
            if any(t.dtype != spec.dtype for t in tensors) or sum(t.nbytes for t in tensors) != spec.nbytes:
                raise AssertionError(f"{spec.name}: produced {[(t.dtype, list(t.shape)) for t in tensors]}")
            for part, tensor in zip(parts, tensors):
                if not (isinstance(part, FileSlice) and copy_file_slice(part, stream)):
                    stream.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            done(spec)


@dataclass
class VerifyReport:
    tensors: int = 0
    bytes: int = 0
    shards: int = 0
    max_abs_diff: float = 0.0
    mismatched: list[str] = field(default_factory=list)


def verify_shard(
    path: Path,
    specs: list[TensorSpec],
    check: Callable[[TensorSpec, torch.Tensor], float | None],
    report: VerifyReport,
    progress: Callable[[int], None] = lambda nbytes: None,
) -> None:
    """Reload the shard's tensors with `safetensors.safe_open` and pass each to `check(spec, written)`: `None` when
    it is what was meant to be written, else the largest absolute difference (recorded as mismatched). The shard is
    reopened every `VERIFY_GROUP_BYTES`, so that its mapped pages do not pile up in this process."""
    with safe_open(path, framework="pt") as handle:
        stored, metadata = set(handle.keys()), handle.metadata() or {}
    names = {spec.name for spec in specs}
    if stored != names or metadata.get("format") != "pt":
        raise SafetensorsWriteError(f"{path.name} holds {sorted(stored ^ names)} it should not (or misses them)")
    groups, size = [[]], 0
    for spec in specs:
        if size > VERIFY_GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    for group in groups:
        with safe_open(path, framework="pt") as handle:
            for spec in group:
                written = handle.get_tensor(spec.name)
                same_layout = written.dtype == spec.dtype and tuple(written.shape) == spec.shape
                difference = check(spec, written) if same_layout else float("inf")
                if difference is not None:
                    report.mismatched.append(spec.name)
                    report.max_abs_diff = max(report.max_abs_diff, difference)
                report.tensors += 1
                report.bytes += spec.nbytes
                progress(spec.nbytes)
    report.shards += 1


@dataclass
class ShardedFiles:
    """What `write_sharded_safetensors` wrote: shard file -> tensor names, and the verification when asked."""

    filename_to_tensors: dict[str, list[str]]
    verify: VerifyReport | None


def write_sharded_safetensors(
    folder: Path,
    specs: list[TensorSpec],
    produce: Callable[[TensorSpec], list[Part]],
    max_shard_size: int | str,
    check: Callable[[TensorSpec, torch.Tensor], float | None] | None = None,
    written: Callable[[TensorSpec], None] = lambda spec: None,
    total_parameters: int | None = None,
) -> ShardedFiles:
    """Write `specs` (in this order) into `folder` as `save_pretrained` names the files: `model.safetensors`, or
    `model-0000i-of-0000n.safetensors` of at most `max_shard_size` each + `model.safetensors.index.json` (with
    `total_parameters` in its metadata). `produce(spec)` gives a tensor's bytes as parts (tensors, or slices of a
    mapped file, copied in the kernel); `written(spec)` follows each tensor (e.g. to release its source's pages).

    Each shard is fsynced and, with `check`, read back and checked tensor by tensor (see `verify_shard`) in a
    background thread while the next one is written: the writing waits on the disk, the verification reads the page
    cache, where the shard's pages still are. One shard is in flight at most: memory stays bounded, and an error in
    the verification surfaces before the next shard starts.
    """
    meta = {spec.name: torch.empty(spec.shape, dtype=spec.dtype, device="meta") for spec in specs}
    pattern = MODEL_WEIGHTS_FILE.replace(".safetensors", "{suffix}.safetensors")  # as save_pretrained
    split = split_torch_state_dict_into_shards(meta, filename_pattern=pattern, max_shard_size=max_shard_size)
    by_name = {spec.name: spec for spec in specs}
    report = VerifyReport() if check is not None else None
    total = sum(spec.nbytes for spec in specs) * (2 if check is not None else 1)
    description = "Writing and verifying shards" if check is not None else "Writing shards"
    lock = threading.Lock()
    with (
        hf_logging.tqdm(total=total, unit="B", unit_scale=True, desc=description) as bar,
        ThreadPoolExecutor(1) as pool,
    ):

        def advance(nbytes: int) -> None:
            with lock:
                bar.update(nbytes)

        def after_tensor(spec: TensorSpec) -> None:
            written(spec)
            advance(spec.nbytes)

        def finish(path: Path, shard: list[TensorSpec]) -> None:
            sync_path(path)
            if report is not None:
                verify_shard(path, shard, check, report, advance)

        names = [*split.filename_to_tensors, *([MODEL_WEIGHTS_INDEX_FILE] if split.is_sharded else [])]
        if existing := [name for name in names if os.path.lexists(folder / name)]:
            raise SafetensorsWriteError(
                f"{folder} already holds {', '.join(existing)}: not overwritten; write into a new (staged) folder"
            )
        created: list[Path] = []
        pending = None
        try:
            for filename, tensor_names in split.filename_to_tensors.items():
                shard = [by_name[name] for name in tensor_names]
                created.append(folder / filename)
                write_safetensors_file(folder / filename, shard, produce, after_tensor)
                if pending is not None:
                    pending.result()
                pending = pool.submit(finish, folder / filename, shard)
            if pending is not None:
                pending.result()
            if split.is_sharded:
                metadata = {"total_parameters": total_parameters} if total_parameters is not None else {}
                index = {"metadata": {**metadata, **split.metadata}, "weight_map": dict(split.tensor_to_filename)}
                created.append(folder / MODEL_WEIGHTS_INDEX_FILE)
                text = json.dumps(index, indent=2, sort_keys=True) + "\n"
                write_text_atomically(folder / MODEL_WEIGHTS_INDEX_FILE, text)
        except BaseException:
            if pending is not None and not pending.cancel():
                wait([pending])  # the verification thread is done with the shard before it is removed
            for path in created:  # only the files this call created: a failure leaves the folder as it was
                path.unlink(missing_ok=True)
            raise
    return ShardedFiles(filename_to_tensors=split.filename_to_tensors, verify=report)
