"""One image decoder everywhere: EXIF orientation and 16-bit images seen alike by the training readers, the evaluation
loader, the processor and the pipeline."""

import json

import numpy as np
import pytest
from PIL import Image

from magma_hf.data import load_magma_dataset
from magma_hf.evaluation.data import load_eval_set
from magma_hf.pipeline_magma import MagmaImageToTextPipeline
from tests.helpers import random_image

ROTATE_270 = 6  # EXIF orientation 6: the camera was turned; the pixels must be turned 270 degrees to stand upright


def write_dataset(root, image_name: str, save) -> None:
    """A one-sample dataset in the original layout whose image is written by `save(path)`."""
    (root / "images" / "0").mkdir(parents=True)
    (root / "image_data" / "0").mkdir(parents=True)
    save(root / "images" / "0" / image_name)
    sample = {"image_path": f"images/0/{image_name}", "captions": ["a picture"], "metadata": {"image_id": 1}}
    (root / "image_data" / "0" / "0.json").write_text(json.dumps(sample))


def save_phone_photo(path) -> np.ndarray:
    """A landscape PNG (lossless) tagged with EXIF orientation 6; returns the upright pixels the viewer must see."""
    photo = random_image(5, size=(80, 48))
    exif = Image.Exif()
    exif[0x0112] = ROTATE_270
    photo.save(path, exif=exif.tobytes())
    return np.asarray(photo.transpose(Image.Transpose.ROTATE_270))


def save_16_bit_gray(path) -> np.ndarray:
    """A dark 16-bit PNG (mode I;16, values up to 20000 of 65535); returns its 8-bit pixels, value * 255 / 65535."""
    values = (np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 6) % 20000
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    return np.round(values * (255 / 65535)).astype(np.uint8)


def pixel_values(processor, image) -> np.ndarray:
    return processor.image_processor(image, return_tensors="np")["pixel_values"][0]


@pytest.mark.parametrize("kind", ["exif", "16bit"])
def test_every_path_decodes_an_image_alike(tmp_path, kind, tokenizer, processor, model):
    save = save_phone_photo if kind == "exif" else save_16_bit_gray
    name = "photo.png" if kind == "exif" else "scan.png"
    expected_box = {}
    write_dataset(tmp_path / "data", name, lambda path: expected_box.setdefault("pixels", save(path)))
    path = tmp_path / "data" / "images" / "0" / name
    expected = expected_box["pixels"]
    reference = pixel_values(processor, Image.fromarray(expected))

    training_image = load_magma_dataset(tmp_path / "data")[0]["image"]
    assert np.array_equal(np.asarray(training_image), expected), "training reader"
    evaluation_image = load_eval_set(tmp_path / "data", "caption").image(0)
    assert np.array_equal(np.asarray(evaluation_image), expected), "evaluation loader"

    assert np.array_equal(pixel_values(processor, str(path)), reference), "processor given the path"
    pipe = MagmaImageToTextPipeline(model=model, processor=processor, tokenizer=tokenizer)
    from_pipeline = pipe.preprocess({"images": str(path), "text": ""})["pixel_values"][0].numpy()
    assert np.array_equal(from_pipeline, reference), "pipeline given the path"
    if kind == "16bit":  # a 16-bit PIL image handed over as it is opened: scaled, not clipped to white
        assert np.array_equal(pixel_values(processor, Image.open(path)), reference), "processor given the PIL image"
        from_pil = pipe.preprocess({"images": Image.open(path), "text": ""})["pixel_values"][0].numpy()
        assert np.array_equal(from_pil, reference), "pipeline given the PIL image"
    white = pixel_values(processor, Image.new("RGB", (64, 48), (255, 255, 255)))
    assert not np.array_equal(reference, white)


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [("I", [0, 65535, 32768], [0, 255, 128]), ("F", [0.0, 1.0, 0.5], [0, 255, 128]), ("F", [0, 200, 7], [0, 200, 7])],
)
def test_deep_modes_scale_to_8_bits(mode, values, expected):
    from magma_hf.image_processing_magma import to_8bit

    image = Image.fromarray(np.array([values], dtype=np.int32 if mode == "I" else np.float32))
    assert image.mode == mode
    scaled = to_8bit(image)
    assert scaled.mode == "L" and np.asarray(scaled).tolist() == [expected]


@pytest.mark.parametrize(
    ("mode", "values", "message"), [("I", [-3, 70000], "-3..70000"), ("F", [0.0, 300.0], "0..300")]
)
def test_deep_mode_out_of_range_is_named(mode, values, message, processor):
    image = Image.fromarray(np.array([values], dtype=np.int32 if mode == "I" else np.float32))
    with pytest.raises(ValueError, match=f"mode {mode} image of size \\(2, 1\\) holds values {message}; expected"):
        processor.image_processor(image)


def test_ordinary_images_pass_the_decoder_unchanged(tmp_path):
    from magma_hf.image_processing_magma import open_image, to_8bit

    for mode in ("RGB", "L", "P", "RGBA", "1", "CMYK"):
        image = random_image(3, size=(20, 16)).convert(mode)
        assert to_8bit(image) is image
        path = tmp_path / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        image.save(path)
        decoded = open_image(path)
        assert decoded.mode == mode and decoded.tobytes() == Image.open(path).convert(mode).tobytes()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_transformers_load_image(tmp_path, orientation):
    from transformers.image_utils import load_image

    from magma_hf.image_processing_magma import open_image

    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.png"
    random_image(orientation, size=(30, 20)).save(path, exif=exif.tobytes())
    decoded = open_image(path)
    assert decoded.size == ((30, 20) if orientation <= 4 else (20, 30))
    assert np.array_equal(np.asarray(decoded), np.asarray(load_image(str(path))))


def test_evaluation_names_an_image_that_cannot_be_decoded(tmp_path):
    write_dataset(tmp_path / "data", "broken.jpg", lambda path: path.write_bytes(b"<html>not an image</html>"))
    eval_set = load_eval_set(tmp_path / "data", "caption")
    with pytest.raises(ValueError, match=r"cannot read the image of example 1 \(the image file cannot be decoded"):
        eval_set.image(0)


def test_an_in_memory_integer_image_of_8_bit_values_is_processed_as_before(processor):
    """`Image.fromarray` of int32 pixels gives mode `I`: values that fit in 0..255 keep their RGB conversion."""
    import numpy as np
    from PIL import Image

    values = np.random.default_rng(0).integers(0, 256, (70, 90), dtype=np.int32)
    as_int = Image.fromarray(values)
    assert as_int.mode == "I"
    expected = processor.image_processor(Image.fromarray(values.astype(np.uint8)), return_tensors="np")
    got = processor.image_processor(as_int, return_tensors="np")
    assert np.array_equal(got["pixel_values"], expected["pixel_values"])
