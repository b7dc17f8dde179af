"""Image-caption data for MAGMA: the readers that training, evaluation, captioning and the demo share.

- `decoding`: MAGMA's one image decoder, caption cleaning and the count of dropped samples (`SkipReport`).
- `sources`: map-style readers (`datasets.Dataset`) of the original MAGMA layout, imagefolder, img2dataset's `files`
  output and 🤗 datasets, and the one layout detector (`detect_layout`).
- `convert`: `convert_dataset`, any image-caption iterator into the original layout.
- `shards`: `.tar` / parquet shards (img2dataset's `webdataset` and `parquet` output), a streamed 🤗 dataset and
  map-style folders as lists of shards read where they lie; `ShardIndex`, random access to shards for captioning
  and evaluation.
- `streaming`: `MagmaStream` / `build_stream`, the training stream over shards (sharding over processes and workers,
  shuffling, mixing, exact resume).

Nothing here imports the model or the trainer: the readers also run in vLLM's environment.
"""

from .convert import ConversionSummary, convert_dataset
from .decoding import (
    IMAGE_EXTENSIONS,
    MAX_SKIPPED_SHARE,
    SKIP_EXAMPLES,
    SkipReport,
    TooManySkippedError,
    check_skipped_share,
    decode_image,
    recording_skips,
)
from .sources import (
    detect_layout,
    from_hf_dataset,
    iter_img2dataset,
    load_image_caption_dataset,
    load_imagefolder,
    load_img2dataset,
    load_magma_dataset,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_SKIPPED_SHARE",
    "SKIP_EXAMPLES",
    "ConversionSummary",
    "SkipReport",
    "TooManySkippedError",
    "check_skipped_share",
    "convert_dataset",
    "decode_image",
    "detect_layout",
    "from_hf_dataset",
    "iter_img2dataset",
    "load_image_caption_dataset",
    "load_imagefolder",
    "load_img2dataset",
    "load_magma_dataset",
    "recording_skips",
]
