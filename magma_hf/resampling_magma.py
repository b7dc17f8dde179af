"""Pillow's resize of 8-bit images, reproduced exactly in torch integer arithmetic (batched, on any device).

Pillow resizes with a separable filter: a horizontal pass, then a vertical one, each rounded and clipped to 8 bits.
Each output pixel's coefficients are the filter sampled around its centre (stretched by the scale when
downscaling, which is the antialiasing), normalised to sum 1 and turned into fixed point with 22 fractional bits
(`PRECISION_BITS`, 32 - 8 - 2 in libImaging/Resample.c). A pass adds `pixel * coefficient` to half a unit in an
integer and keeps the bits above the fraction, clipped to 0..255. Here the coefficients are computed on the CPU in
float64 with Pillow's own operation order (so they are the same integers), and the passes run in integers on the
images' device (int32, Pillow's C int, where the largest possible sum fits, as it does for all of Pillow's filters;
int64 otherwise): integer sums have no rounding to depend on the order or the hardware, so the result is Pillow's,
bit for bit. Checked against the installed Pillow in tests/processing/test_image_processing_backends.py.
"""

import functools
import math

import numpy as np
import PIL.Image
import torch
from packaging.version import Version

PRECISION_BITS = 32 - 8 - 2
HALF = 1 << (PRECISION_BITS - 1)  # the rounding term a pass starts its sum from
# Pillow 12.2 and later resize an image taller than 100 times its width vertically first when they shrink it
# vertically (the arithmetic is otherwise the same since Pillow 10.0 at least, the oldest this package supports).
TALL_IMAGE_RATIO = 100 if Version(PIL.__version__).release >= (12, 2) else None
Resampling = PIL.Image.Resampling


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5  # Keys' cubic, as Pillow's (a = -0.5)
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _box(x: np.ndarray) -> np.ndarray:
    return np.where((x > -0.5) & (x <= 0.5), 1.0, 0.0)


# Pillow's constants are C floats (0.54f, 0.46f), widened to double in the sum.
_HAMMING_A, _HAMMING_B = float(np.float32(0.54)), float(np.float32(0.46))
# The C library's sin and cos (Python's math module calls them), not numpy's vectorised ones, which may differ by
# an ulp.
_sin, _cos = np.vectorize(math.sin, otypes=[np.float64]), np.vectorize(math.cos, otypes=[np.float64])


def _sinc(x: np.ndarray) -> np.ndarray:
    safe = np.where(x == 0.0, 1.0, x) * math.pi
    return np.where(x == 0.0, 1.0, _sin(safe) / safe)


def _hamming(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    scaled = np.where((x == 0.0) | (x >= 1.0), 0.5, x) * math.pi
    value = _sin(scaled) / scaled * (_HAMMING_A + _HAMMING_B * _cos(scaled))
    return np.where(x == 0.0, 1.0, np.where(x >= 1.0, 0.0, value))


def _lanczos(x: np.ndarray) -> np.ndarray:
    return np.where((x >= -3.0) & (x < 3.0), _sinc(x) * _sinc(x / 3), 0.0)


# Pillow's filters and their support (radius in input pixels at scale 1). NEAREST is not a filter in Pillow either.
FILTERS = {
    Resampling.BOX: (_box, 0.5),
    Resampling.BILINEAR: (_bilinear, 1.0),
    Resampling.HAMMING: (_hamming, 1.0),
    Resampling.BICUBIC: (_bicubic, 2.0),
    Resampling.LANCZOS: (_lanczos, 3.0),
}


@functools.lru_cache(maxsize=32)
def pillow_coefficients(in_size: int, out_size: int, resample: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's fixed-point coefficients for resizing one axis from `in_size` to `out_size` pixels.

    Returns `first` (`[out_size]` int64, the first input pixel each output pixel reads) and `weights`
    (`[out_size, taps]` int64, zero past each output's last input pixel), such that output `i` is
    `clip((HALF + sum_t input[first[i] + t] * weights[i, t]) >> PRECISION_BITS, 0, 255)`.
    """
    filter_function, support = FILTERS[Resampling(resample)]
    # Every step below is Pillow's (precompute_coeffs, normalize_coeffs_8bpc) in the same float64 operation order.
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    taps = math.ceil(support) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    offsets = np.arange(taps)
    used = offsets[None, :] < count[:, None]
    arguments = ((offsets[None, :] + first[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale)
    weights = np.where(used, filter_function(arguments), 0.0)
    total = np.zeros(out_size)
    for tap in range(taps):  # summed left to right, as Pillow does (numpy's sum would pair them differently)
        total = total + weights[:, tap]
    weights = np.divide(weights, total[:, None], out=weights.copy(), where=total[:, None] != 0.0)
    fixed = weights * (1 << PRECISION_BITS)
    fixed = np.trunc(np.where(fixed < 0, fixed - 0.5, fixed + 0.5)).astype(np.int64)  # C's (int)(x +- 0.5)
    return first, fixed


# Rows of the horizontal pass transposed and filtered at a time on the CPU: the sums stay in cache (measured fastest
# on a 12-megapixel photo among 256..4096).
CPU_CHUNK_ROWS = 1024


@functools.lru_cache(maxsize=64)
def _axis_plan(in_size: int, out_size: int, resample: int, start: int, stop: int):
    """How outputs `start..stop-1` of one axis are computed from inputs `low..high-1`: returns `(low, high, index,
    weights)`, `index` `[taps, n]` (input pixels relative to `low`) and `weights` `[taps, n]` (int64, Pillow's)."""
    first, weights = pillow_coefficients(in_size, out_size, resample)
    first, weights = first[start:stop], weights[start:stop]
    taps = weights.shape[1]
    count = taps - np.argmax(weights[:, ::-1] != 0, axis=1)  # past the last non-zero weight nothing is read
    low, high = int(first.min()), int(min((first + count).max(), in_size))
    # Past an output's last input pixel the weight is 0: any index inside the read range will do.
    index = np.minimum(first[None, :] - low + np.arange(taps)[:, None], high - low - 1)
    return low, high, index, np.ascontiguousarray(weights.T)


@functools.lru_cache(maxsize=64)
def _device_plan(in_size: int, out_size: int, resample: int, start: int, stop: int, device: str):
    """[`_axis_plan`]'s index and weights as tensors on `device`, the weights in the accumulator's type: Pillow sums
    in a C int, and int32 is as exact wherever the largest possible sum fits (always, for Pillow's filters) and
    several times faster than int64 on the CPU, which is used otherwise."""
    low, high, index, weights = _axis_plan(in_size, out_size, resample, start, stop)
    dtype = torch.int32 if HALF + 255 * int(np.abs(weights).sum(axis=0).max()) < 2**31 else torch.int64
    return low, high, torch.from_numpy(index).to(device), torch.from_numpy(weights).to(device=device, dtype=dtype)


def _filter_axis(images: torch.Tensor, dim: int, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One of Pillow's passes along `dim`, which must not be the last axis (gathering whole rows copies contiguous
    memory): `images` (8-bit values) -> uint8, `dim` of size `index.shape[1]`."""
    # Once, not at every tap; contiguous, or index_select would copy the whole input at every tap
    images = images.to(weights.dtype, memory_format=torch.contiguous_format)
    shape = (-1, *([1] * (images.dim() - dim - 1)))  # the weights along `dim`
    total = images.index_select(dim, index[0]).mul_(weights[0].view(shape)).add_(HALF)
    for tap in range(1, index.shape[0]):  # a tap at a time: memory stays at one output image
        total.addcmul_(images.index_select(dim, index[tap]), weights[tap].view(shape))
    return total.bitwise_right_shift_(PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def _filter_rows(images: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Pillow's horizontal pass on `[batch, height, width, k]` (contiguous; k: channels stored last, or 1): a chunk
    of rows at a time made width-first (so that a tap gathers whole rows), filtered, and put back in place.
    Returns `[batch, height, index.shape[1], k]` uint8."""
    batch, height, width, k = images.shape
    rows = images.reshape(batch * height, width, k)
    chunk = CPU_CHUNK_ROWS if images.device.type == "cpu" else max(rows.shape[0], 1)
    out = torch.empty((index.shape[1], rows.shape[0], k), dtype=torch.uint8, device=images.device)
    for start in range(0, rows.shape[0], chunk):
        part = rows[start : start + chunk]
        columns = torch.empty((width, part.shape[0], k), dtype=weights.dtype, device=images.device)
        out[:, start : start + part.shape[0]] = _filter_axis(columns.copy_(part.transpose(0, 1)), 0, index, weights)
    return out.transpose(0, 1).reshape(batch, height, index.shape[1], k)


def pillow_resize(
    images: torch.Tensor,
    size: tuple[int, int],
    resample: int = Resampling.BICUBIC,
    crop: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Resize 8-bit images exactly as Pillow's `Image.resize((width, height), resample)` does (no `box`, no
    `reducing_gap`) on an `L` or `RGB` image holding the same pixels.

    Args:
        images: `[..., height, width]` uint8 (e.g. `[n, channels, height, width]`), on any device; channels stored
            last in memory (a `permute(2, 0, 1)` of an `[height, width, channels]` array) are read as they are.
        size: `(height, width)` of the resized image.
        resample: BOX, BILINEAR, HAMMING, BICUBIC or LANCZOS (`PIL.Image.Resampling` or its int).
        crop: `(top, left, height, width)` of the resized image to return: only those pixels are computed (each
            output pixel depends only on its own row's and column's coefficients, so they are the same values).

    Returns:
        `[..., height, width]` (of `crop`, else of `size`) uint8, contiguous, on the images' device.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"pillow_resize takes uint8 images, got {images.dtype}")
    if Resampling(resample) not in FILTERS:
        names = ", ".join(f.name for f in FILTERS)
        raise ValueError(f"pillow_resize has no {Resampling(resample).name} filter (Pillow's are {names})")
    *leading, height, width = images.shape
    out_height, out_width = size
    top, left, crop_height, crop_width = crop if crop is not None else (0, 0, out_height, out_width)
    if min(out_height, out_width, crop_height, crop_width) < 1:
        raise ValueError(f"height and width must be > 0, got size {tuple(size)}, crop {crop}")
    if top < 0 or left < 0 or top + crop_height > out_height or left + crop_width > out_width:
        raise ValueError(f"crop {crop} is not inside the resized image of size {tuple(size)}")
    device = str(images.device)
    # Where an axis keeps its size Pillow leaves it as it is (no pass), and the crop is a slice of the input.
    vertical = out_height != height and _device_plan(height, out_height, int(resample), top, top + crop_height, device)
    horizontal = out_width != width and _device_plan(width, out_width, int(resample), left, left + crop_width, device)
    row_low, row_high = vertical[:2] if vertical else (top, top + crop_height)
    column_low, column_high = horizontal[:2] if horizontal else (left, left + crop_width)
    # Work on [batch, height, width, k]: channels stored last stay so (k = channels, no transposing copy here),
    # any other layout is made [..., height, width] contiguous (k = 1).
    channels_last = images.dim() >= 3 and images.stride(-3) == 1 and images.shape[-3] > 1
    x = images.movedim(-3, -1) if channels_last else images.unsqueeze(-1)
    x = x.reshape(-1, height, width, x.shape[-1])[:, row_low:row_high, column_low:column_high].contiguous()
    if x.numel() > 0:
        if TALL_IMAGE_RATIO and height > width * TALL_IMAGE_RATIO and out_height < height:  # Pillow's order
            x = _filter_axis(x, 1, *vertical[2:]) if vertical else x
            x = _filter_rows(x, *horizontal[2:]) if horizontal else x
        else:
            x = _filter_rows(x, *horizontal[2:]) if horizontal else x
            x = _filter_axis(x, 1, *vertical[2:]) if vertical else x
    if channels_last:
        x = x.reshape(*leading[:-1], crop_height, crop_width, leading[-1]).movedim(-1, -3)
    else:
        x = x.reshape(*leading, crop_height, crop_width)
    return x.contiguous() if vertical or horizontal else x.clone(memory_format=torch.contiguous_format)


__all__ = ["FILTERS", "PRECISION_BITS", "pillow_coefficients", "pillow_resize"]
