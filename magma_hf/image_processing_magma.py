"""MAGMA's image preprocessing: CLIP's, as the original applied it with torchvision on PIL images (exactly so for RGB
and grayscale; see [`MagmaImageProcessor`] for transparent, palette and CMYK images), the same bit for bit with
transformers' torchvision backend (the default one), and the one image decoder every MAGMA path uses (training
readers, evaluation, processor and pipeline)."""

import inspect
import io
import math
import os
from collections.abc import Collection
from typing import BinaryIO

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from transformers.image_transforms import convert_to_rgb as pil_convert_to_rgb
from transformers.image_transforms import (
    get_resize_output_image_size,
    get_size_with_aspect_ratio,
    group_images_by_shape,
    reorder_images,
)
from transformers.image_transforms import resize as pil_resize_array
from transformers.image_utils import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ChannelDimension,
    PILImageResampling,
    get_image_size_for_max_height_width,
    load_image,
    torch_pil_interpolation_mapping,
)
from transformers.models.clip.image_processing_clip import CLIPImageProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from .hub_magma import auto_map_left_unchanged
from .resampling_magma import FILTERS, pillow_resize

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


# Whether transformers has its newer RGB conversion (`return_numpy`; transparency composited over white, arrays
# converted too), which both backends use; older 5.x versions (vLLM's) convert only PIL images, with `convert("RGB")`.
CONVERT_TO_RGB_RETURNS_NUMPY = "return_numpy" in inspect.signature(pil_convert_to_rgb).parameters
# The type both image processors save, as transformers' own backend pairs do (`CLIPImageProcessorPil` saves
# "CLIPImageProcessor"): a saved folder names no backend, `AutoImageProcessor` picks the class for the one asked for.
SAVED_TYPE = "MagmaImageProcessor"


class MagmaImageProcessingMixin:
    """What MAGMA's two image processors share: CLIP's settings at the model's image size, MAGMA's one decoder for
    paths and PIL images ([`load_image_input`], [`to_8bit`]), torchvision's crop offsets and one saved form."""

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

    def to_dict(self) -> dict:
        """The saved form, the same for both backends: `image_processor_type` is "MagmaImageProcessor" and the Hub
        code's `auto_map` names both classes by backend, so `trust_remote_code` resolves `backend=` as the package
        does."""
        output = super().to_dict()
        ours = (SAVED_TYPE, TORCHVISION_CLASS_NAME)  # a subclass of either saves its own name, as transformers does
        if output.get("image_processor_type") in ours:
            output["image_processor_type"] = SAVED_TYPE
        auto_map = output.get("auto_map")
        reference = auto_map.get("AutoImageProcessor") if isinstance(auto_map, dict) else None
        # "image_processing_magma.<class>", as transformers writes it when saving
        if isinstance(reference, str) and reference.rsplit(".", 1)[-1] in ours:
            module = reference.rsplit(".", 1)[0]
            output["auto_map"] = {
                **auto_map,
                "AutoImageProcessor": {
                    "torchvision": f"{module}.{TORCHVISION_CLASS_NAME}",
                    "pil": f"{module}.{SAVED_TYPE}",
                },
            }
        return output


class MagmaImageProcessor(MagmaImageProcessingMixin, CLIPImageProcessorPil):
    """CLIP preprocessing on PIL images: shortest side to `image_size` (bicubic), centre crop, scale to [0, 1], CLIP
    mean/std. `AutoImageProcessor` gives it for `backend="pil"`; [`MagmaImageProcessorTorchvision`] computes the
    same pixel values, bit for bit, and is the default.

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
    """MAGMA's preprocessing with transformers' torchvision backend: tensors, batched by size, on `device=` if given,
    and equal to [`MagmaImageProcessor`] bit for bit. `AutoImageProcessor` gives it for `backend="torchvision"` and
    when no backend is asked for (transformers' default), as for transformers' own models.

    The resize is Pillow's, reproduced in torch integer arithmetic ([`pillow_resize`]): torchvision's antialiased
    bicubic differs from Pillow's by an 8-bit step here and there. Rescaling and normalisation are the PIL backend's
    float operations, RGB conversion of RGBA arrays and the crop of a too-small image its numpy steps. What
    [`pillow_resize`] does not cover (Pillow's NEAREST, 2- and 4-channel images, which Pillow resizes with
    premultiplied alpha, and float images, which the PIL backend quantises to 8 bits around the resize) is resized
    by Pillow itself, image by image, as the PIL backend does.

    Output `pixel_values`: `[n_images, 3, image_size, image_size]`.
    """

    def process_image(self, image, do_convert_rgb=None, input_data_format=None, device=None, **kwargs) -> torch.Tensor:
        """transformers' conversion to a `[channels, height, width]` tensor, except that a PIL image's pixels stay
        channels last, where numpy put them (a `permute` view, not a copy): [`pillow_resize`] reads them so, which
        saves a copy of the full-size image (stacking a batch makes one anyway)."""
        if not isinstance(image, PIL.Image.Image) or not CONVERT_TO_RGB_RETURNS_NUMPY:
            return super().process_image(
                image, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format, device=device, **kwargs
            )
        image = to_8bit(image, decoded_from_file=False)
        tensor = torch.from_numpy(pil_convert_to_rgb(image, return_numpy=True) if do_convert_rgb else np.array(image))
        tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
        return tensor if device is None else tensor.to(device)

    def _preprocess(
        self, images: list[torch.Tensor], do_resize: bool, size, resample, do_center_crop: bool, crop_size, **kwargs
    ):
        """transformers' torchvision `_preprocess`, the resize and the crop done in one step where [`pillow_resize`]
        applies: only the crop's pixels are computed (the same values as resizing, then cropping)."""
        if do_resize and do_center_crop:
            grouped, order = group_images_by_shape(images, disable_grouping=kwargs.get("disable_grouping"))
            cropped = {
                shape: self._resize_and_crop(stacked, size, resample, crop_size) for shape, stacked in grouped.items()
            }
            images, do_resize, do_center_crop = reorder_images(cropped, order), False, False
        return super()._preprocess(
            images, do_resize=do_resize, size=size, resample=resample, do_center_crop=do_center_crop,
            crop_size=crop_size, **kwargs,
        )

    def _resize_and_crop(self, images: torch.Tensor, size, resample, crop_size) -> torch.Tensor:
        """`center_crop(resize(images))` for `[n, channels, height, width]` images."""
        resample = _pil_resampling(resample)
        height, width = _resize_output_size(images, size)
        if _pillow_resize_applies(images, resample) and crop_size.height <= height and crop_size.width <= width:
            top, left = torchvision_crop_offsets(height, width, crop_size.height, crop_size.width)
            crop = (top, left, crop_size.height, crop_size.width)
            return pillow_resize(images.to(torch.uint8), (height, width), resample, crop=crop)
        return self.center_crop(self.resize(images, size, resample), crop_size)

    def resize(self, image: torch.Tensor, size, resample=None, antialias: bool = True, **kwargs) -> torch.Tensor:
        """Resize `[n, channels, height, width]` images to `size` as the PIL backend does (`antialias` is ignored:
        Pillow's filters always are)."""
        resample = _pil_resampling(resample)
        new_size = _resize_output_size(image, size)
        if _pillow_resize_applies(image, resample):
            # The PIL backend casts integer arrays to uint8 for Pillow (`check_8bit_array` refused any beyond 8 bits)
            return pillow_resize(image.to(torch.uint8), new_size, resample)
        first = ChannelDimension.FIRST
        resized = [
            pil_resize_array(one.cpu().numpy(), new_size, resample, data_format=first, input_data_format=first)
            for one in image.reshape(-1, *image.shape[-3:])
        ]
        return torch.from_numpy(np.stack(resized)).reshape(*image.shape[:-2], *new_size).to(image.device)

    def center_crop(self, image: torch.Tensor, size, **kwargs) -> torch.Tensor:
        """The crop of [`MagmaImageProcessor`]: an image smaller than `size` is padded with zeros as transformers'
        numpy `center_crop` pads it (the torchvision backend would place it a pixel off)."""
        height, width = image.shape[-2:]
        if size.height <= height and size.width <= width:
            return super().center_crop(image, size, **kwargs)
        new_height, new_width = max(size.height, height), max(size.width, width)
        top_pad, left_pad = math.ceil((new_height - height) / 2), math.ceil((new_width - width) / 2)
        padded = image.new_zeros((*image.shape[:-2], new_height, new_width))
        padded[..., top_pad : top_pad + height, left_pad : left_pad + width] = image
        top, left = (height - size.height) // 2 + top_pad, (width - size.width) // 2 + left_pad
        return padded[..., max(0, top) : top + size.height, max(0, left) : left + size.width]

    def convert_to_rgb(self, image, *args, **kwargs):
        """RGB from a 1- or 4-channel `[channels, height, width]` tensor as the PIL backend converts arrays: an
        alpha channel composited over white in float64 and rounded half to even (torchvision's conversion truncates).
        Where transformers is older (see `CONVERT_TO_RGB_RETURNS_NUMPY`), its own conversion, as the PIL backend's."""
        if not CONVERT_TO_RGB_RETURNS_NUMPY or not isinstance(image, torch.Tensor):
            return super().convert_to_rgb(image, *args, **kwargs)
        if image.ndim == 3 and image.shape[0] == 4:
            if image.is_floating_point() and (image.min() < 0.0 or image.max() > 1.0):
                return super().convert_to_rgb(image, *args, **kwargs)  # its error message
            white = 1.0 if image.is_floating_point() else 255
            work = image if image.is_floating_point() else image.to(torch.float64)
            alpha = work[3:4] / white
            composite = alpha * work[:3] + (1 - alpha) * white
            return (composite if image.is_floating_point() else composite.round()).to(image.dtype)
        return super().convert_to_rgb(image, *args, **kwargs)

    def rescale_and_normalize(
        self, images: torch.Tensor, do_rescale: bool, rescale_factor: float, do_normalize: bool, image_mean, image_std
    ) -> torch.Tensor:
        """The PIL backend's float operations: rescale in float64, stored as float32, then `(x - mean) / std` in the
        images' float type. 8-bit images go through a 256-entry table of those values per channel, computed on the
        CPU: the result cannot depend on the device's float arithmetic."""
        if images.dtype == torch.uint8 and (do_rescale or do_normalize):
            channels = images.shape[-3]
            levels = torch.arange(256, dtype=torch.uint8).expand(channels, 256)[..., None]  # [channels, 256, 1]
            table = self._rescale_and_normalize(levels, do_rescale, rescale_factor, do_normalize, image_mean, image_std)
            table = table[..., 0].to(images.device)  # [channels, 256]
            offsets = torch.arange(channels, device=images.device)[:, None, None] * 256
            return torch.take(table, images.to(torch.int64) + offsets)
        return self._rescale_and_normalize(images, do_rescale, rescale_factor, do_normalize, image_mean, image_std)

    @staticmethod
    def _rescale_and_normalize(images, do_rescale, rescale_factor, do_normalize, image_mean, image_std):
        """transformers' numpy `rescale` and `normalize` on `[..., channels, height, width]` tensors."""
        if do_rescale:
            images = (images.to(torch.float64) * rescale_factor).to(torch.float32)
        if do_normalize:
            if not images.is_floating_point():
                images = images.to(torch.float32)
            channels = images.shape[-3]
            mean = image_mean if isinstance(image_mean, Collection) else [image_mean] * channels
            std = image_std if isinstance(image_std, Collection) else [image_std] * channels
            mean = torch.tensor(mean, dtype=images.dtype, device=images.device)[:, None, None]
            std = torch.tensor(std, dtype=images.dtype, device=images.device)[:, None, None]
            images = (images - mean) / std
        return images


TORCHVISION_CLASS_NAME = MagmaImageProcessorTorchvision.__name__


def _pillow_resize_applies(images: torch.Tensor, resample: PILImageResampling) -> bool:
    """Whether [`pillow_resize`] gives what Pillow gives the PIL backend for these `[n, channels, height, width]`
    images: 8-bit values (any integer type) in an `L` or `RGB` image and one of Pillow's filters (NEAREST is none)."""
    return images.shape[-3] in (1, 3) and not images.is_floating_point() and resample in FILTERS


def _pil_resampling(resample) -> PILImageResampling:
    """The Pillow filter the PIL backend uses for `resample` (a Pillow filter, its int, or a torchvision mode)."""
    if resample is None:
        return PILImageResampling.BILINEAR
    if isinstance(resample, (PILImageResampling, int)):
        return PILImageResampling(resample)
    return torch_pil_interpolation_mapping.get(resample, PILImageResampling.BILINEAR)


def _resize_output_size(image: torch.Tensor, size) -> tuple[int, int]:
    """`(height, width)` after a resize to `size` (a `SizeDict`), as both of transformers' backends compute it."""
    height, width = image.shape[-2:]
    if size.shortest_edge and size.longest_edge:
        return get_size_with_aspect_ratio((height, width), size.shortest_edge, size.longest_edge)
    if size.shortest_edge:
        return get_resize_output_image_size(
            image, size=size.shortest_edge, default_to_square=False, input_data_format=ChannelDimension.FIRST
        )
    if size.max_height and size.max_width:
        return get_image_size_for_max_height_width((height, width), size.max_height, size.max_width)
    if size.height and size.width:
        return size.height, size.width
    raise ValueError(f"Size must have 'height' and 'width', 'max_height' and 'max_width', or 'shortest_edge': {size}")


# The backend name that gives [`MagmaImageProcessorTorchvision`] from `AutoImageProcessor` (and the default one).
TORCHVISION_BACKEND = "torchvision"


__all__ = [
    "MagmaImageProcessor",
    "MagmaImageProcessorTorchvision",
    "TORCHVISION_BACKEND",
    "open_image",
    "to_8bit",
]
