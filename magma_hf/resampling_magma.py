"""Pillow's resize of 8-bit images, reproduced exactly in torch integer arithmetic (batched, on any device).

Pillow resizes with a separable filter: a horizontal pass, then a vertical one, each rounded and clipped to 8 bits.
Each output pixel's coefficients are the filter sampled around its centre (stretched by the scale when
downscaling, which is the antialiasing), normalised to sum 1 and turned into fixed point with 22 fractional bits
(`PRECISION_BITS`, 32 - 8 - 2 in libImaging/Resample.c). A pass adds `pixel * coefficient` to half a unit in an
integer and keeps the bits above the fraction, clipped to 0..255. Here the coefficients are computed on the CPU in
float64 with Pillow's own operation order (so they are the same integers), and the passes run in int64 on the
images' device: integer sums have no rounding to depend on the order or the hardware, so the result is Pillow's,
bit for bit. Checked against the installed Pillow in tests/test_image_processing_backends.py.
"""

import functools
import math

import numpy as np
import PIL.Image
import torch

PRECISION_BITS = 32 - 8 - 2
HALF = 1 << (PRECISION_BITS - 1)  # the rounding term a pass starts its sum from
# Pillow resizes an image taller than 100 times its width vertically first when it shrinks it vertically.
TALL_IMAGE_RATIO = 100
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


def _resample_axis(images: torch.Tensor, dim: int, out_size: int, resample: int) -> torch.Tensor:
    """One of Pillow's passes along `dim`, which must not be the last axis (gathering whole rows is a copy of
    contiguous memory; the horizontal pass transposes first): `images.shape[dim]` -> `out_size`, uint8 out.

    `images` holds 8-bit values, as uint8 or already in the accumulator's integer type.
    """
    in_size = images.shape[dim]
    first, weights = pillow_coefficients(in_size, out_size, int(resample))
    dtype = _accumulator_dtype(weights)
    images = images.to(dtype)  # once, not at every tap
    first = torch.from_numpy(first).to(images.device)
    weights = torch.from_numpy(weights).to(device=images.device, dtype=dtype)
    weights = weights.view(out_size, weights.shape[1], *([1] * (images.dim() - dim - 1)))
    shape = list(images.shape)
    shape[dim] = out_size
    total = torch.full(shape, HALF, dtype=dtype, device=images.device)
    for tap in range(weights.shape[1]):  # a tap at a time: memory stays at one output image
        index = (first + tap).clamp_(max=in_size - 1)  # past the last input pixel the weight is 0: any index will do
        total.addcmul_(images.index_select(dim, index), weights[:, tap])
    return total.bitwise_right_shift_(PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def _accumulator_dtype(weights: np.ndarray) -> torch.dtype:
    """Pillow sums in a C int: int32 is as exact wherever the largest possible sum fits (always, for Pillow's
    filters), and several times faster than int64 on the CPU; int64 otherwise."""
    bound = HALF + 255 * int(np.abs(weights).sum(axis=1).max())
    return torch.int32 if bound < 2**31 else torch.int64


def _resample_rows(images: torch.Tensor, out_width: int, resample: int) -> torch.Tensor:
    """Pillow's horizontal pass: `[batch, height, width]` -> `[batch, height, out_width]`, uint8."""
    batch, height, width = images.shape
    rows = images.reshape(batch * height, width)
    dtype = _accumulator_dtype(pillow_coefficients(width, out_width, int(resample))[1])
    chunk = CPU_CHUNK_ROWS if images.device.type == "cpu" else rows.shape[0]
    out = torch.empty((out_width, rows.shape[0]), dtype=torch.uint8, device=images.device)
    for start in range(0, rows.shape[0], chunk):
        part = rows[start : start + chunk]
        columns = torch.empty((width, part.shape[0]), dtype=dtype, device=images.device).copy_(part.t())
        out[:, start : start + part.shape[0]] = _resample_axis(columns, 0, out_width, resample)
    return out.t().contiguous().view(batch, height, out_width)


def pillow_resize(images: torch.Tensor, size: tuple[int, int], resample: int = Resampling.BICUBIC) -> torch.Tensor:
    """Resize 8-bit images exactly as Pillow's `Image.resize((width, height), resample)` does (no `box`, no
    `reducing_gap`) on an `L` or `RGB` image holding the same pixels.

    Args:
        images: `[..., height, width]` uint8 (e.g. `[n, channels, height, width]`), on any device.
        size: `(height, width)` of the output.
        resample: BOX, BILINEAR, HAMMING, BICUBIC or LANCZOS (`PIL.Image.Resampling` or its int).

    Returns:
        `[..., size[0], size[1]]` uint8, contiguous, on the images' device.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"pillow_resize takes uint8 images, got {images.dtype}")
    if Resampling(resample) not in FILTERS:
        names = ", ".join(f.name for f in FILTERS)
        raise ValueError(f"pillow_resize has no {Resampling(resample).name} filter (Pillow's are {names})")
    *leading, height, width = images.shape
    out_height, out_width = size
    if out_height < 1 or out_width < 1:
        raise ValueError(f"height and width must be > 0, got {tuple(size)}")
    x = images.reshape(-1, height, width)
    if x.shape[0] == 0 or (out_height, out_width) == (height, width):
        return images.clone().contiguous()
    horizontal, vertical = out_width != width, out_height != height
    if height > width * TALL_IMAGE_RATIO and out_height < height:  # Pillow's order for very tall images
        x = _resample_axis(x, 1, out_height, resample)
        x = _resample_rows(x, out_width, resample) if horizontal else x
    else:
        x = _resample_rows(x, out_width, resample) if horizontal else x
        x = _resample_axis(x, 1, out_height, resample) if vertical else x
    return x.reshape(*leading, out_height, out_width).contiguous()


__all__ = ["FILTERS", "PRECISION_BITS", "pillow_coefficients", "pillow_resize"]
