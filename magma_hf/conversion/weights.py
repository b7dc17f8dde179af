"""Writing the planned tensors into safetensors files, and checking what was written: each tensor cast to the output
dtype (or copied file to file where no cast is needed), the input embedding padded with zero rows, every value checked
finite, and (with verification) every tensor read back and compared bitwise with its source.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from .checkpoint import MagmaConversionError, OriginalCheckpoint
from .plan import ConversionPlan, TensorEntry, bitwise_equal
from .safetensors_writer import (
    FileSlice,
    MappedFile,
    SafetensorsWriteError,
    VerifyReport,
    part_tensor,
    write_sharded_safetensors,
)


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
    if tuple(source.shape) != entry.shape:  # only the input embedding (checked in plan_conversion: 2-d, fewer rows)
        parts.append(torch.zeros((entry.shape[0] - source.shape[0], *entry.shape[1:]), dtype=entry.dtype))
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
        if problem := non_finite_problem(entry, part_tensor(parts[0]), source):  # the padding rows are zeros
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

    checked = None if verify else non_finite  # without verification, the values are checked while written
    produce = partial(produce_parts, state_dict=state_dict, locate=pages.slice_of, non_finite=checked)
    try:
        written = write_sharded_safetensors(
            folder, plan.entries, produce, max_shard_size, check=check if verify else None,
            written=lambda entry: pages.release(state_dict[entry.source]), total_parameters=total_parameters,
        )  # fmt: skip
    except SafetensorsWriteError as error:
        raise MagmaConversionError(f"{checkpoint.path}: {error}") from error
    return written.filename_to_tensors, written.verify, non_finite
