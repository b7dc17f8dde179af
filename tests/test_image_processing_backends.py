"""MagmaImageProcessorTorchvision: transformers' torchvision backend for MAGMA, and which class each backend gets."""

import numpy as np
import pytest
import torch
from helpers import CLIP_MEAN, CLIP_STD, random_image, sample_photos
from PIL import Image
from transformers import AutoImageProcessor

from magma_hf import MagmaImageProcessor, MagmaImageProcessorTorchvision
from magma_hf.image_processing_magma import TORCHVISION_BACKEND
from magma_hf.resampling_magma import FILTERS, pillow_resize

# Measured by tests/benchmarks/bench_image_processors.py on 10 photographs: at most two 8-bit steps
# (0.030 after normalisation), mean 4.7e-5, 0.32% of the values differ.
EIGHT_BIT_STEP = 1 / (255 * min(CLIP_STD))
MAX_DIFFERENCE = 2 * EIGHT_BIT_STEP + 1e-5


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# (height, width) -> (height, width); noise images, so the filters' overshoot is clipped at 0 and 255 everywhere.
RESIZES = [
    ((427, 640), (384, 575)),  # a photo to CLIP's shortest side
    ((61, 83), (64, 87)),  # slightly up
    ((9, 7), (53, 41)),  # far up
    ((333, 517), (47, 73)),  # far down: filters 7 times wider
    ((1, 1), (5, 3)),
    ((5, 700), (9, 384)),  # up in one axis, down in the other
    ((700, 5), (30, 2)),  # over 100 times taller than wide: Pillow resizes such images vertically first
    ((64, 80), (64, 33)),  # only one axis changes
]


@pytest.mark.parametrize("resample", list(FILTERS), ids=lambda f: f.name)
@pytest.mark.parametrize(("in_size", "out_size"), RESIZES, ids=str)
def test_pillow_resize_equals_pillow_bit_for_bit(resample, in_size, out_size):
    rng = np.random.default_rng(in_size[0] * 1000 + in_size[1])
    rgb = rng.integers(0, 256, (*in_size, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, in_size, dtype=np.uint8)
    size = (out_size[1], out_size[0])
    expected_rgb = np.asarray(Image.fromarray(rgb).resize(size, resample)).transpose(2, 0, 1)
    expected_gray = np.asarray(Image.fromarray(gray).resize(size, resample))[None]
    batch = torch.from_numpy(np.stack([rgb.transpose(2, 0, 1), np.repeat(gray[None], 3, 0)]))
    resized = pillow_resize(batch, out_size, resample)
    assert resized.dtype == torch.uint8 and resized.shape == (2, 3, *out_size)
    np.testing.assert_array_equal(resized[0].numpy(), expected_rgb)
    np.testing.assert_array_equal(resized[1, :1].numpy(), expected_gray)
    np.testing.assert_array_equal(pillow_resize(torch.from_numpy(gray), out_size, resample).numpy(), expected_gray[0])


@pytest.mark.parametrize("device", DEVICES)
def test_pillow_resize_equals_pillow_on_real_photographs(device):
    for photo in sample_photos():
        for size in [(384, 575), (96, 144), (1000, 1500)]:
            expected = np.asarray(photo.resize(size[::-1], Image.Resampling.BICUBIC)).transpose(2, 0, 1)
            images = torch.from_numpy(np.asarray(photo).transpose(2, 0, 1).copy()).to(device)
            np.testing.assert_array_equal(pillow_resize(images, size).cpu().numpy(), expected)


def test_pillow_resize_refuses_what_it_cannot_reproduce():
    with pytest.raises(TypeError, match="uint8"):
        pillow_resize(torch.zeros(3, 8, 8), (4, 4))
    with pytest.raises(ValueError, match="NEAREST"):
        pillow_resize(torch.zeros(3, 8, 8, dtype=torch.uint8), (4, 4), Image.Resampling.NEAREST)


def smooth_image() -> Image.Image:
    y, x = np.mgrid[0:71, 0:97]
    return Image.fromarray(np.stack([x * 255 / 96, y * 255 / 70, (x + y) * 255 / 166], -1).round().astype(np.uint8))


def test_torchvision_processor_output_is_normalised_rgb_of_the_image_size():
    pixel_values = MagmaImageProcessorTorchvision(image_size=64)(random_image(0), return_tensors="pt").pixel_values
    assert pixel_values.shape == (1, 3, 64, 64) and pixel_values.dtype == torch.float32
    rgb = pixel_values[0] * torch.tensor(CLIP_STD)[:, None, None] + torch.tensor(CLIP_MEAN)[:, None, None]
    assert rgb.min() >= -1e-5 and rgb.max() <= 1 + 1e-5
    white = MagmaImageProcessorTorchvision(image_size=64)(Image.new("RGB", (80, 64), "white"), return_tensors="pt")
    expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(white.pixel_values[0, :, 10, 10], expected, atol=1e-5)


def test_torchvision_processor_is_within_the_measured_bound_of_the_faithful_one():
    image = smooth_image()
    faithful = MagmaImageProcessor(image_size=64)(image, return_tensors="np").pixel_values
    fast = MagmaImageProcessorTorchvision(image_size=64)(image, return_tensors="np").pixel_values
    difference = np.abs(faithful - fast)
    assert difference.max() <= MAX_DIFFERENCE
    assert difference.mean() <= 1e-3


def test_torchvision_processor_crops_odd_margins_as_torchvision():
    image = smooth_image().resize((67, 64))  # shortest side already 64: a 3-pixel margin, torchvision puts 2 left
    faithful = MagmaImageProcessor(image_size=64)(image, return_tensors="np").pixel_values
    fast = MagmaImageProcessorTorchvision(image_size=64)(image, return_tensors="np").pixel_values
    assert np.abs(faithful - fast).max() <= 1e-5  # no resize: only the crop, which must agree exactly


def test_torchvision_processor_reads_paths_and_16_bit_images_with_magmas_decoder(tmp_path):
    gray = (np.linspace(0, 60000, 64 * 80).reshape(64, 80)).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(gray).save(path)  # a 16-bit PNG: Pillow's own RGB conversion would clip it to white
    faithful = MagmaImageProcessor(image_size=64)(str(path), return_tensors="np").pixel_values
    fast = MagmaImageProcessorTorchvision(image_size=64)(str(path), return_tensors="np").pixel_values
    assert np.abs(faithful - fast).max() <= 1e-5
    assert fast.std() > 0.5  # a gradient, not a white image


def test_torchvision_processor_round_trips_through_save_pretrained(tmp_path):
    processor = MagmaImageProcessorTorchvision(image_size=96)
    processor.save_pretrained(tmp_path)
    for reloaded in (
        MagmaImageProcessorTorchvision.from_pretrained(tmp_path),
        AutoImageProcessor.from_pretrained(tmp_path, backend=TORCHVISION_BACKEND),
    ):
        assert type(reloaded) is MagmaImageProcessorTorchvision
        assert reloaded.to_dict() == processor.to_dict()
        image = random_image(1)
        expected = processor(image, return_tensors="pt").pixel_values
        assert torch.equal(reloaded(image, return_tensors="pt").pixel_values, expected)


@pytest.mark.parametrize(
    ("saved", "request_kwargs", "expected"),
    [
        (MagmaImageProcessor, {}, MagmaImageProcessor),  # transformers asks for torchvision by default
        (MagmaImageProcessor, {"backend": "torchvision"}, MagmaImageProcessor),
        (MagmaImageProcessor, {"backend": "pil"}, MagmaImageProcessor),
        (MagmaImageProcessor, {"backend": TORCHVISION_BACKEND}, MagmaImageProcessorTorchvision),
        (MagmaImageProcessorTorchvision, {}, MagmaImageProcessor),  # the faithful one stays the default
        (MagmaImageProcessorTorchvision, {"backend": "pil"}, MagmaImageProcessor),
    ],
)
def test_auto_image_processor_gives_the_faithful_one_unless_the_torchvision_one_is_named(
    tmp_path, saved, request_kwargs, expected
):
    saved(image_size=64).save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path, **request_kwargs)
    assert type(loaded) is expected
    assert loaded.crop_size["height"] == 64


@pytest.mark.parametrize("processor_class", [MagmaImageProcessor, MagmaImageProcessorTorchvision])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_16_bit_arrays_are_refused_with_their_dtype_and_range(processor_class, as_tensor):
    """A 16-bit array used to be read as 0..255: pixel values up to ~900 instead of CLIP's range, and no error."""
    array = np.linspace(0, 65535, 70 * 90 * 3).reshape(70, 90, 3).astype(np.uint16)
    image = torch.from_numpy(array.astype(np.int32)) if as_tensor else array
    expected = r"(uint16|int32) and shape \(70, 90, 3\) holds values 0\.\.65535; expected 8-bit"
    with pytest.raises(ValueError, match=expected):
        processor_class(image_size=64)(image, return_tensors="np")
    in_range = (array // 257).astype(np.uint16)  # 16-bit dtype, 8-bit values: read as before
    pixel_values = processor_class(image_size=64)(in_range, return_tensors="np").pixel_values
    assert np.isfinite(pixel_values).all() and np.abs(pixel_values).max() < 3
