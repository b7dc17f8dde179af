"""MAGMA's image preprocessing: CLIP's, exactly as the original applied it with torchvision on PIL images."""

import numpy as np
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

DEFAULT_IMAGE_SIZE = 384  # CLIP RN50x16


class MagmaImageProcessor(CLIPImageProcessorPil):
    """CLIP preprocessing on PIL images: shortest side to `image_size` (bicubic), centre crop, scale to [0, 1], CLIP
    mean/std. RGBA, grayscale, palette and CMYK images are converted to RGB first (transparency over white).

    It matches torchvision's `Resize(image_size, BICUBIC)`, `CenterCrop`, `ToTensor`, `Normalize` on the PIL image,
    which is what MAGMA was trained with: the one difference from CLIP's processor in transformers is where an odd
    crop margin puts the extra pixel (torchvision rounds half to even, transformers floors).

    Output `pixel_values`: `[n_images, 3, image_size, image_size]`.
    """

    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"shortest_edge": DEFAULT_IMAGE_SIZE}
    crop_size = {"height": DEFAULT_IMAGE_SIZE, "width": DEFAULT_IMAGE_SIZE}

    def __init__(self, image_size: int | None = None, **kwargs):
        if image_size is not None:
            kwargs.setdefault("size", {"shortest_edge": image_size})
            kwargs.setdefault("crop_size", {"height": image_size, "width": image_size})
        super().__init__(**kwargs)

    def center_crop(self, image: np.ndarray, size, **kwargs) -> np.ndarray:
        """Crop a `[c, h, w]` array to `size` around its centre, offsets rounded as torchvision's `CenterCrop`."""
        height, width = image.shape[-2:]
        if size.height > height or size.width > width:
            return super().center_crop(image, size, **kwargs)  # padding needed: never the case after the resize
        top = int(round((height - size.height) / 2.0))
        left = int(round((width - size.width) / 2.0))
        return image[..., top : top + size.height, left : left + size.width]


__all__ = ["MagmaImageProcessor"]
