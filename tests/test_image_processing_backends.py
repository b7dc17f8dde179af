"""MagmaImageProcessorTorchvision: transformers' torchvision backend for MAGMA, and which class each backend gets."""

import numpy as np
import pytest
import torch
from helpers import CLIP_MEAN, CLIP_STD, random_image
from PIL import Image
from transformers import AutoImageProcessor

from magma_hf import MagmaImageProcessor, MagmaImageProcessorTorchvision
from magma_hf.image_processing_magma import TORCHVISION_BACKEND

# Measured by tests/benchmarks/bench_image_processors.py on 10 photographs: at most two 8-bit steps
# (0.030 after normalisation), mean 4.7e-5, 0.32% of the values differ.
EIGHT_BIT_STEP = 1 / (255 * min(CLIP_STD))
MAX_DIFFERENCE = 2 * EIGHT_BIT_STEP + 1e-5


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
