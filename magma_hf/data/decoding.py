"""MAGMA's one way to read a sample: the image decoder, caption cleaning, and the count of the samples a reader drops.

Every reader of `magma_hf.data` (the map-style ones in `sources`, the streams in `streaming`) and the commands that
read images (`magma-hf caption`, evaluation) decode through [`decode_image`] (`image_processing_magma.open_image`:
EXIF orientation applied, 16-bit images scaled to 8, truncated files refused) and judge captions with
[`clean_captions`] / [`caption_problem`], so a bad sample is handled the same way wherever it is read.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import PIL.Image
from transformers.utils import logging

from ..image_processing_magma import open_image

logger = logging.get_logger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Per-process record of images that failed to decode, so each one is warned about once.
_WARNED_IMAGES: set[str] = set()


def is_main_local_process() -> bool:
    """Load-time warnings and bars once per machine: every rank of a distributed run reads the same files."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


# A training run stops when it skips more than this share of its samples (`max_skipped_share` in its config).
MAX_SKIPPED_SHARE = 0.5  # more than half: the run trains on (almost) nothing; fewer are warned about only
SKIP_EXAMPLES = 5  # bad samples an error names
# The lists of `recording_skips()` blocks now open: each SkipReport made meanwhile joins them.
_SKIP_RECORDERS: list[list[SkipReport]] = []


class SkipReport:
    """Collects the samples a reader drops: one warning each, then a summary with the counts per reason."""

    def __init__(self, source: str):
        self.source = source
        self.reasons: Counter[str] = Counter()
        self.examples: list[str] = []  # the first SKIP_EXAMPLES dropped samples, for an error that names them
        self.kept = 0
        for recorder in _SKIP_RECORDERS:
            recorder.append(self)

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    def skip(self, what: str, reason: str) -> None:
        self.reasons[reason] += 1
        if len(self.examples) < SKIP_EXAMPLES:
            self.examples.append(f"{what} ({reason})")
        if is_main_local_process():
            logger.warning(f"Skipping {what}: {reason}")

    def summarize(self, kept: int) -> None:
        self.kept = kept
        skipped = self.skipped
        if skipped and is_main_local_process():
            by_kind: Counter[str] = Counter()
            for reason, count in self.reasons.items():
                by_kind[reason.split(":")[0]] += count
            counts = ", ".join(f"{count} {kind}" for kind, count in by_kind.most_common())
            logger.warning(f"{self.source}: kept {kept} samples, skipped {skipped} ({counts})")


@contextmanager
def recording_skips() -> Iterator[list[SkipReport]]:
    """The SkipReports of every reader run inside the block, so that a caller can judge how much was dropped."""
    reports: list[SkipReport] = []
    _SKIP_RECORDERS.append(reports)
    try:
        yield reports
    finally:
        _SKIP_RECORDERS.remove(reports)


class TooManySkippedError(ValueError):
    """More than the allowed share of a run's samples was skipped: it would train on (almost) nothing."""


def check_skipped_share(skipped: int, total: int, examples: Sequence[str], max_share: float, what: str) -> None:
    """Raise [`TooManySkippedError`] naming the count and the first bad samples when `skipped / total > max_share`."""
    if total and skipped > max_share * total:
        raise TooManySkippedError(
            f"{what}: {skipped} of {total} samples were skipped ({skipped / total:.0%}), more than max_skipped_share "
            f"{max_share:g}. First: " + "; ".join(examples[:SKIP_EXAMPLES]) + ". Fix or remove these samples, or "
            "raise max_skipped_share"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Lazy decoding


def decode_image(value: dict | PIL.Image.Image | None) -> tuple[PIL.Image.Image | None, str | None]:
    """Decode one `{"path", "bytes"}` image value with MAGMA's one decoder ([`open_image`]: read in full, so truncated
    files fail here and not later; EXIF orientation applied; 16-bit and float images scaled to 8 bits).

    Returns `(image, None)` or `(None, reason)`; never raises for a bad image.
    """
    if isinstance(value, PIL.Image.Image):
        return value, None
    if not value:
        return None, "no image"
    try:
        return open_image(value["bytes"] if value.get("bytes") is not None else value["path"]), None
    except Exception as error:  # PIL raises many types for bad files (OSError, ValueError, SyntaxError, ...)
        return None, f"{type(error).__name__}: {error}"


def image_label(value: dict | None, fallback: str) -> str:
    if value and value.get("path"):
        return str(value["path"])
    if value and value.get("bytes") is not None:
        return f"{fallback} (bytes, sha1 {hashlib.sha1(value['bytes']).hexdigest()[:12]})"
    return fallback


def decode_images_transform(batch: dict[str, list]) -> dict[str, list]:
    """The format transform of every dataset here: `image` values become PIL images, or `None` (warned once)."""
    images = []
    for value in batch["image"]:
        image, error = decode_image(value)
        if image is None:
            label = image_label(value, "image")
            if label not in _WARNED_IMAGES:
                _WARNED_IMAGES.add(label)
                logger.warning(f"Skipping sample: cannot decode image {label}: {error}")
        images.append(image)
    return {"image": images}


def clean_captions(captions: Any) -> list[str] | None:
    """A list of non-empty caption strings; a single string counts as one caption. `None` when there is none."""
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, (list, tuple)):
        return None
    cleaned = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
    return cleaned or None


def caption_problem(captions: Any) -> str | None:
    """What makes captions unusable as text beyond being empty: a caption that is bytes, or a string that is not valid
    UTF-8 (lone surrogates, as `os.fsdecode` or `errors="surrogateescape"` leave them). `None` when there is none."""
    items = [captions] if isinstance(captions, (str, bytes, bytearray)) else captions
    if not isinstance(items, (list, tuple)):
        return None
    for index, caption in enumerate(items):
        if isinstance(caption, (bytes, bytearray)):
            return f"caption {index} is bytes ({bytes(caption[:40])!r}), not text: decode it, e.g. .decode('utf-8')"
        if isinstance(caption, str):
            try:
                caption.encode("utf-8")
            except UnicodeEncodeError as error:
                return (
                    f"caption {index} is not valid UTF-8 text: {caption[error.start]!r} at character {error.start} "
                    f"of {caption[:40]!r}"
                )
    return None


def shown_path(path: str | os.PathLike) -> str:
    """A path as text that prints and serialises anywhere: the bytes of a name that are not UTF-8 (Linux allows any)
    as `\\xNN`, where `str(path)` would hold lone surrogates that fail as a codec error naming no file."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def name_problem(path: str | os.PathLike) -> str | None:
    """`None` for a path that is valid UTF-8, else why it cannot be kept: Arrow columns and JSON lines hold UTF-8."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return f"{shown_path(path)} is not valid UTF-8 (rename it)"
    return None


def utf8_problem(raw: bytes, name: str) -> str | None:
    """`None` for valid UTF-8, else where it is not: the file, its line and byte, and the offending byte."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        byte = raw[error.start : error.start + 1]
        return f"{name} is not valid UTF-8 (line {line}, byte {error.start}: {byte!r}): fix or remove that sample"
    return None

