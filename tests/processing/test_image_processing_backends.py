"""MagmaImageProcessorTorchvision: Pillow's resize in torch, pixel values equal to the PIL processor's bit for bit, and
which class each backend name gives (as transformers resolves it for its own models)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, CLIPImageProcessor

from magma_hf import MagmaImageProcessor, MagmaImageProcessorTorchvision, MagmaProcessor
from magma_hf.image_processing_magma import TORCHVISION_BACKEND
from magma_hf.resampling_magma import FILTERS, pillow_resize
from tests.helpers import make_tokenizer, photo_variants, random_image, sample_photos

BACKENDS = {TORCHVISION_BACKEND: MagmaImageProcessorTorchvision, "pil": MagmaImageProcessor}
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
    top, left, height, width = out_size[0] // 3, out_size[1] // 4, out_size[0] - out_size[0] // 3, out_size[1] // 2 + 1
    cropped = pillow_resize(batch, out_size, resample, crop=(top, left, height, width))  # only the crop computed
    torch.testing.assert_close(cropped, resized[..., top : top + height, left : left + width], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_pillow_resize_equals_pillow_on_real_photographs(device):
    for photo in sample_photos():
        for size in [(384, 575), (96, 144), (1000, 1500)]:
            expected = np.asarray(photo.resize(size[::-1], Image.Resampling.BICUBIC)).transpose(2, 0, 1)
            channels_last = torch.from_numpy(np.array(photo)).to(device).permute(2, 0, 1)  # as numpy holds them
            for images in (channels_last, channels_last.contiguous()):
                np.testing.assert_array_equal(pillow_resize(images, size).cpu().numpy(), expected)


def test_pillow_resize_refuses_what_it_cannot_reproduce():
    with pytest.raises(TypeError, match="uint8"):
        pillow_resize(torch.zeros(3, 8, 8), (4, 4))
    with pytest.raises(ValueError, match="NEAREST"):
        pillow_resize(torch.zeros(3, 8, 8, dtype=torch.uint8), (4, 4), Image.Resampling.NEAREST)
    with pytest.raises(ValueError, match="not inside"):
        pillow_resize(torch.zeros(3, 8, 8, dtype=torch.uint8), (4, 4), crop=(1, 0, 4, 4))


def assert_backends_equal(images, init: dict | None = None, **call) -> torch.Tensor:
    """Both processors' `pixel_values` for `images`, asserted equal bit for bit; returns them."""
    init = {"image_size": 64, **(init or {})}
    expected = MagmaImageProcessor(**init)(images, return_tensors="pt", **call).pixel_values
    for device in DEVICES:
        fast = MagmaImageProcessorTorchvision(**init)(images, return_tensors="pt", device=device, **call)
        assert fast.pixel_values.dtype == expected.dtype and fast.pixel_values.device.type == device
        torch.testing.assert_close(fast.pixel_values.cpu(), expected, rtol=0, atol=0)
    return expected


def test_torchvision_backend_equals_the_pil_backend_on_photographs():
    """Failed before: torchvision's antialiased bicubic differed from Pillow's by up to two 8-bit steps."""
    assert assert_backends_equal(sample_photos(), {"image_size": 384}).shape == (2, 3, 384, 384)
    assert_backends_equal(photo_variants()[1:5], {"image_size": 384})  # portrait, wide, square, upsampled


def rgba_array(seed: int) -> np.ndarray:
    array = np.asarray(random_image(seed, (50, 41), "RGBA")).copy()
    array[..., 3] = np.random.default_rng(seed).integers(0, 256, array.shape[:2])
    return array


def deep_image(mode: str) -> Image.Image:
    values = np.linspace(0, 1, 61 * 77).reshape(61, 77)
    if mode == "F":
        return Image.fromarray(values.astype(np.float32), mode="F")
    return Image.fromarray((values * 65535).astype(np.uint16))


INPUTS = {
    "upscaled": lambda: random_image(0, (37, 50)),
    "downscaled odd": lambda: random_image(1, (301, 203)),
    "RGBA": lambda: Image.fromarray(rgba_array(2)),
    "LA": lambda: Image.fromarray(rgba_array(3)).convert("LA"),
    "P": lambda: random_image(4, (90, 70)).convert("P"),
    "CMYK": lambda: random_image(5, (90, 70)).convert("CMYK"),
    "L": lambda: random_image(6, (90, 70), "L"),
    "1": lambda: random_image(7, (90, 70), "1"),
    "I;16": lambda: deep_image("I;16"),
    "F": lambda: deep_image("F"),
    "uint8 HWC array": lambda: np.array(random_image(8, (90, 70))),
    "uint8 CHW tensor": lambda: torch.from_numpy(np.asarray(random_image(9, (90, 70))).transpose(2, 0, 1).copy()),
    "gray array": lambda: np.array(random_image(10, (90, 70), "L"))[..., None],
    "RGBA array": lambda: rgba_array(11),
    "int64 tensor of 8-bit values": lambda: torch.from_numpy(np.asarray(random_image(12, (90, 70))).astype(np.int64)),
    "float array in 0..1": lambda: np.asarray(random_image(13, (90, 70)), dtype=np.float32) / 255,
    "float array of 0..255": lambda: np.asarray(random_image(14, (90, 70)), dtype=np.float32),
    "mixed sizes": lambda: [random_image(15, (90, 70)), random_image(16, (70, 90)), random_image(17, (90, 70))],
}


@pytest.mark.parametrize("name", INPUTS)
def test_torchvision_backend_equals_the_pil_backend_on_every_input_kind(name):
    assert_backends_equal(INPUTS[name]())


@pytest.mark.parametrize(
    ("init", "call"),
    [
        ({"resample": Image.Resampling.NEAREST}, {}),  # not a filter: Pillow itself resizes, image by image
        ({"resample": Image.Resampling.LANCZOS}, {}),
        ({}, {"resample": Image.Resampling.BILINEAR}),
        ({"size": {"shortest_edge": 48}}, {}),  # crop larger than the image: zero padding, where numpy puts it
        ({"size": {"height": 50, "width": 70}, "do_center_crop": False}, {}),
        ({}, {"do_normalize": False}),
        ({}, {"do_rescale": False}),
        ({}, {"do_rescale": False, "do_normalize": False}),  # uint8 out
        ({"image_mean": 0.5, "image_std": 0.25}, {}),
    ],
)
def test_torchvision_backend_equals_the_pil_backend_with_other_settings(init, call):
    assert_backends_equal([random_image(20, (83, 61)), random_image(21, (61, 83))], init, **call)


def test_saving_either_class_writes_one_backend_free_config(tmp_path):
    """Saved as transformers' own pairs save (`CLIPImageProcessorPil` writes "CLIPImageProcessor"): the same file from
    both classes, the Hub code's `auto_map` naming both by backend."""
    files = []
    for backend, processor_class in BACKENDS.items():
        processor_class(image_size=96).save_pretrained(tmp_path / backend)
        files.append(json.loads((tmp_path / backend / "preprocessor_config.json").read_text()))
    assert files[0] == files[1]
    assert files[0]["image_processor_type"] == "MagmaImageProcessor"
    assert files[0]["auto_map"]["AutoImageProcessor"] == {
        "torchvision": "image_processing_magma.MagmaImageProcessorTorchvision",
        "pil": "image_processing_magma.MagmaImageProcessor",
    }


@pytest.mark.parametrize("saved", BACKENDS)
@pytest.mark.parametrize("loaded", BACKENDS)
def test_save_load_round_trip_through_every_class_and_auto_entry_point(tmp_path, saved, loaded):
    """transformers' preprocessing contract (save_load_with_auto_class, save_load_backends[_auto]), with the dicts
    compared to the processor's before saving: saving changes nothing, and a reload equals it whatever its class."""
    first = BACKENDS[saved](image_size=96)
    expected, expected_json = first.to_dict(), first.to_json_string()
    first.save_pretrained(tmp_path)
    assert first.to_dict() == expected
    for second in (
        BACKENDS[loaded].from_pretrained(tmp_path),
        BACKENDS[loaded].from_json_file(tmp_path / "preprocessor_config.json"),
        AutoImageProcessor.from_pretrained(tmp_path, backend=loaded),
    ):
        assert type(second) is BACKENDS[loaded] and second.backend == loaded
        assert second.to_dict() == expected
        assert second.to_json_string() == expected_json  # `resample` an int on both sides, not an enum on one
    image = random_image(22)
    torch.testing.assert_close(
        second(image, return_tensors="pt").pixel_values, first(image, return_tensors="pt").pixel_values, rtol=0, atol=0
    )


@pytest.mark.parametrize("saved", BACKENDS)
def test_processor_round_trip_gives_each_backend_and_the_same_image_processor(tmp_path, saved):
    processor = MagmaProcessor(image_processor=BACKENDS[saved](image_size=64), tokenizer=make_tokenizer())
    expected = processor.image_processor.to_dict()
    processor.save_pretrained(tmp_path)
    requests = [({}, "torchvision"), ({"backend": "torchvision"}, "torchvision"), ({"backend": "pil"}, "pil")]
    for request, backend in requests:
        for loader in (AutoProcessor, MagmaProcessor):
            image_processor = loader.from_pretrained(tmp_path, **request).image_processor
            assert type(image_processor) is BACKENDS[backend], (loader, request)
            assert image_processor.to_dict() == expected


REQUESTS = [{}, {"backend": "torchvision"}, {"backend": "pil"}, {"use_fast": True}, {"use_fast": False}]


@pytest.mark.parametrize("request_kwargs", [*REQUESTS, {"backend": "torchvision_approximate"}], ids=str)
def test_every_backend_request_resolves_as_for_transformers_own_clip(tmp_path, request_kwargs):
    """Failed before: "torchvision" and no backend gave the PIL class. The old `torchvision_approximate` name is not
    a backend now: transformers falls back to the first one mapped, "pil", for CLIP and MAGMA alike."""
    CLIPImageProcessor().save_pretrained(tmp_path / "clip")
    MagmaImageProcessor(image_size=64).save_pretrained(tmp_path / "magma")
    clip = AutoImageProcessor.from_pretrained(tmp_path / "clip", **request_kwargs)
    magma = AutoImageProcessor.from_pretrained(tmp_path / "magma", **request_kwargs)
    assert magma.backend == clip.backend
    assert type(magma) is BACKENDS[magma.backend]


def test_paths_and_16_bit_files_are_read_with_magmas_decoder(tmp_path):
    gray = np.linspace(0, 60000, 64 * 80).reshape(64, 80).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(gray).save(path)  # a 16-bit PNG: Pillow's own RGB conversion would clip it to white
    pixel_values = assert_backends_equal(str(path))
    assert pixel_values.std() > 0.5  # a gradient, not a white image


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
