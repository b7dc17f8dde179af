"""MAGMA's image preprocessing: CLIP's, as the original applied it with torchvision on PIL images (exactly so for RGB
and grayscale; see [`MagmaImageProcessor`] for transparent, palette and CMYK images), its torchvision-backend
variant, and the one image decoder every MAGMA path uses (training readers, evaluation, processor and pipeline)."""

import io
import os
from typing import BinaryIO

import numpy as np
import PIL.Image
import PIL.ImageOps
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling, load_image
from transformers.models.clip.image_processing_clip import CLIPImageProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from .hub_magma import auto_map_left_unchanged

DEFAULT_IMAGE_SIZE = 384  # CLIP RN50x16
# Pillow's modes deeper than 8 bits per channel: its RGB conversion clips them at 255 (a 16-bit image turns white).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
UINT16_MAX = 65535
EXIF_ORIENTATION = 0x0112  # PIL.ExifTags.Base.Orientation


def to_8bit(image: PIL.Image.Image, decoded_from_file: bool = True) -> PIL.Image.Image:
    """An image in a mode deeper than 8 bits scaled to 8-bit grayscale (`L`); any other image returned as it is.

    Integer modes (`I;16*`, and `I`, which is how Pillow holds 16-bit PNG/TIFF data once converted) are read as 16-bit
    values, `0..65535` -> `0..255`. An `I` image built in memory (`decoded_from_file=False`, e.g. `Image.fromarray` of
    int32 pixels) whose values all fit in `0..255` is returned as it is: its RGB conversion is right, as it always was.
    Float images (`F`) are read as `0..1` when all values lie there, else as `0..255`. Values outside those ranges
    would need a guess, so they are an error naming the mode and the range found.
    """
    if image.mode not in (*SIXTEEN_BIT_MODES, "I", "F"):
        return image
    values = np.asarray(image, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode == "I" and not decoded_from_file and low >= 0 and high <= 255:
        return image
    if not np.isfinite(values).all():
        raise ValueError(f"A mode {image.mode} image of size {image.size} holds NaN or infinite values")
    if image.mode == "F" and low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif image.mode == "F" and low >= 0.0 and high <= 255.0:
        scaled = values
    elif image.mode != "F" and low >= 0 and high <= UINT16_MAX:
        scaled = values * (255.0 / UINT16_MAX)
    else:
        expected = "0..1 or 0..255" if image.mode == "F" else f"0..{UINT16_MAX} (16-bit)"
        raise ValueError(
            f"A mode {image.mode} image of size {image.size} holds values {low:g}..{high:g}; expected {expected}. "
            "Convert it to an 8-bit image yourself."
        )
    converted = PIL.Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), mode="L")
    # A tRNS transparency value is in the source's 16-bit units: it would mark the wrong gray as transparent.
    converted.info = {key: value for key, value in image.info.items() if key != "transparency"}
    return converted


def open_image(source: "str | os.PathLike | bytes | BinaryIO") -> PIL.Image.Image:
    """Decode an image file (a path, its bytes or a binary stream) the way MAGMA sees it everywhere.

    The pixels are read in full (a truncated file fails here, not in a later batch), the EXIF orientation is applied
    (a phone photo comes out upright, as transformers' `load_image` shows it), and 16-bit, 32-bit and float images are
    scaled to 8 bits (see [`to_8bit`]). Raises Pillow's error for a file that is not a decodable image.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    with PIL.Image.open(source) as image:
        image.load()
        if image.getexif().get(EXIF_ORIENTATION, 1) not in (None, 1):  # exif_transpose would copy an upright image
            image = PIL.ImageOps.exif_transpose(image)
    return to_8bit(image)


def load_image_input(image, timeout: float | None = None):
    """One image input as MAGMA sees it: a local file through [`open_image`], a PIL image scaled by [`to_8bit`], a URL
    or base64 string through transformers' `load_image`; anything else is returned as it is."""
    if isinstance(image, (str, os.PathLike)) and os.path.isfile(image):
        return open_image(image)
    if isinstance(image, PIL.Image.Image):
        return to_8bit(image, decoded_from_file=False)
    if isinstance(image, str):
        return load_image(image, timeout=timeout)
    return image


def check_8bit_array(image) -> None:
    """Refuse an integer array or tensor with values beyond 8 bits: its pixels are read as 0..255, so a 16-bit image
    would come out far outside CLIP's range without any error. (PIL images are scaled by [`to_8bit`] instead.)"""
    dtype = getattr(image, "dtype", None)
    if dtype is None or str(dtype) in ("uint8", "torch.uint8", "bool", "torch.bool") or 0 in tuple(image.shape):
        return
    is_integer = np.issubdtype(dtype, np.integer) if isinstance(image, np.ndarray) else not image.is_floating_point()
    if not is_integer:
        return
    low, high = int(image.min()), int(image.max())
    if low < 0 or high > 255:
        raise ValueError(
            f"An image array of dtype {dtype} and shape {tuple(image.shape)} holds values {low}..{high}; expected "
            "8-bit values 0..255. Scale it to uint8 (a 16-bit one: `(array // 257).astype('uint8')`) or pass a PIL "
            "image."
        )


def torchvision_crop_offsets(height: int, width: int, crop_height: int, crop_width: int) -> tuple[int, int]:
    """Top and left offset of a centred crop as torchvision's `CenterCrop` rounds them (half to even), which is how
    MAGMA was trained; transformers' processors floor them, which moves an odd margin's extra pixel."""
    return int(round((height - crop_height) / 2.0)), int(round((width - crop_width) / 2.0))


class MagmaImageProcessingMixin:
    """What MAGMA's two image processors share: CLIP's settings at the model's image size, MAGMA's one decoder for
    paths and PIL images ([`load_image_input`], [`to_8bit`]) and torchvision's crop offsets."""

    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"shortest_edge": DEFAULT_IMAGE_SIZE}
    crop_size = {"height": DEFAULT_IMAGE_SIZE, "width": DEFAULT_IMAGE_SIZE}

    def __init__(self, image_size: int | None = None, **kwargs):
        if image_size is not None:
            kwargs.setdefault("size", {"shortest_edge": image_size})
            kwargs.setdefault("crop_size", {"height": image_size, "width": image_size})
        kwargs.pop("auto_map", None)  # loaded from a saved folder: it belongs to the files (`auto_map_left_unchanged`)
        super().__init__(**kwargs)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """transformers' saving, which records `auto_map` on the live image processor to write it: put back."""
        with auto_map_left_unchanged(vars(self)):
            return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    def process_image(self, image, *args, **kwargs):
        """Scale 16-bit, 32-bit and float PIL images to 8 bits before the RGB conversion, which would clip them."""
        if isinstance(image, PIL.Image.Image):
            image = to_8bit(image, decoded_from_file=False)
        else:
            check_8bit_array(image)
        return super().process_image(image, *args, **kwargs)

    def fetch_images(self, image_url_or_urls):
        """Local image paths are decoded by [`open_image`] (EXIF orientation, 16-bit scaled); URLs by transformers."""
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(item) for item in image_url_or_urls]
        if isinstance(image_url_or_urls, (str, os.PathLike)):
            return load_image_input(image_url_or_urls)
        return super().fetch_images(image_url_or_urls)

    def center_crop(self, image, size, **kwargs):
        """Crop a `[..., h, w]` array or tensor to `size` around its centre, offsets rounded as torchvision's."""
        height, width = image.shape[-2:]
        if size.height > height or size.width > width:
            return super().center_crop(image, size, **kwargs)  # padding needed: never the case after the resize
        top, left = torchvision_crop_offsets(height, width, size.height, size.width)
        return image[..., top : top + size.height, left : left + size.width]


class MagmaImageProcessor(MagmaImageProcessingMixin, CLIPImageProcessorPil):
    """CLIP preprocessing on PIL images: shortest side to `image_size` (bicubic), centre crop, scale to [0, 1], CLIP
    mean/std. The faithful one, and what `AutoImageProcessor` gives for every backend request.

    On RGB and grayscale images it matches torchvision's `Resize(image_size, BICUBIC)`, `CenterCrop`, `ToTensor`,
    `Normalize` on the PIL image, which is what MAGMA was trained with: the one difference from CLIP's processor in
    transformers is where an odd crop margin puts the extra pixel (torchvision rounds half to even, transformers
    floors).

    Other modes are converted to RGB *before* the resize, transparency composited over white (transformers'
    `convert_to_rgb`). The original converted *after* the resize and crop, in the image's own mode, so it differs there:
    - RGBA / LA with transparent pixels: the original dropped the alpha channel. Pillow resizes these modes with
      premultiplied alpha, so where the original resized, fully transparent pixels came out black; where no resize
      was needed (shortest side already `image_size`) the colour stored under them showed. This processor shows them
      white, as an image viewer does: dark text on a transparent background (a typical screenshot) stays readable
      instead of turning black on black. Opaque RGBA / LA images give the original's values.
    - P (palette) and 1 (bilevel): Pillow resizes these modes with NEAREST whatever is asked, so the original sampled
      them nearest-neighbour; this processor resizes their RGB conversion bicubically, like any photograph.
    - CMYK: resized in CMYK by the original, in RGB here: values within one 8-bit step of the original's.

    Output `pixel_values`: `[n_images, 3, image_size, image_size]`.
    """


class MagmaImageProcessorTorchvision(MagmaImageProcessingMixin, CLIPImageProcessor):
    """MAGMA's preprocessing with transformers' torchvision backend (tensors, batched, on `device=` if given): the same
    resize of the shortest side to `image_size` (bicubic, antialiased), torchvision's centre crop, CLIP mean/std, RGB
    conversion and 8-bit scaling as [`MagmaImageProcessor`].

    It is not bit-exact with the faithful PIL processor (see the README for the measured difference on photographs),
    so `AutoImageProcessor` never picks it by itself: ask for it with
    `AutoImageProcessor.from_pretrained(path, backend=TORCHVISION_BACKEND)` or use the class directly.

    Output `pixel_values`: `[n_images, 3, image_size, image_size]`.
    """


# The AutoImageProcessor backend name that selects [`MagmaImageProcessorTorchvision`]; "torchvision", which transformers
# also requests by default, keeps giving the faithful PIL processor.
TORCHVISION_BACKEND = "torchvision_approximate"


__all__ = ["MagmaImageProcessor", "MagmaImageProcessorTorchvision", "TORCHVISION_BACKEND", "open_image", "to_8bit"]
