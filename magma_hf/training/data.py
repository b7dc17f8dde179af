"""Image-caption data for MAGMA: readers for the original MAGMA layout, Hugging Face datasets and img2dataset output,
and the original's `convert_dataset`.

Every reader returns a `datasets.Dataset` with the same columns:

- `image`: the image, decoded to a `PIL.Image.Image` when a row is read (lazily: only the rows you access are decoded)
  by MAGMA's one decoder, `image_processing_magma.open_image` (EXIF orientation applied, 16-bit images scaled to 8).
  A row whose image cannot be decoded (corrupt, truncated, not an image, deleted since loading) gives `None` there,
  with one warning per image; [`MagmaDataCollator`] skips such rows. Stored as a `datasets.Image(decode=False)` column
  (`{"path", "bytes"}`) under a format transform, so `select`, `shuffle` and `train_test_split` keep the decoding.
  Reading a whole column (`ds["captions"]`) goes row by row through that transform too, decoding every image: read
  columns from `ds.with_format(None)` instead.
- `image_path`: `str`, the absolute path of the image file (`""` when the image only exists as bytes in the dataset).
- `captions`: `list[str]`, at least one non-empty caption.
- `metadata`: `str`, the sample's metadata as a JSON object string (`json.loads(row["metadata"])` gives the dict); a
  string because metadata keys and value types differ from sample to sample, which an Arrow struct column cannot hold.

Samples that cannot give a correct (image, caption) pair are dropped when the dataset is read: a missing image file, no
caption, an unreadable json. Each drop is one warning naming the file and the reason, and a summary with the counts
follows. They never raise and never pair an image with another sample's caption.

The original layout (`Aleph-Alpha/magma`, `magma/datasets/dataset.py` and `convert_datasets.py`):

```
data_dir/
    images/0/<name>.jpg ...                 # numbered folders of at most `dir_size` images
    image_data/0/0.json ... 9999.json       # one json per sample, numbered folders of at most `dir_size`
    image_data/1/10000.json ...
```

each json `{"image_path": "images/0/<name>.jpg", "captions": ["...", ...], "metadata": {...}}`, with `image_path`
relative to `data_dir`. A json without `image_path` means the image with the json's stem in the matching folder under
`images/` (`image_data/3/123.json` -> `images/3/123.jpg`, as the original reader did), or else beside the json itself.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import PIL.Image
from datasets import Dataset, Features, Value, concatenate_datasets
from tqdm.auto import tqdm
from transformers.utils import logging

from ..image_processing_magma import open_image
from ..io_utils import atomic_path, remove_leftover_temporaries, write_text_atomically

try:  # datasets >= 4
    from datasets import List as _ListFeature
except ImportError:  # pragma: no cover - datasets 3.x
    from datasets import Sequence as _ListFeature

logger = logging.get_logger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_COLUMNS = ("text", "caption", "captions", "txt")
FEATURES = Features(
    {
        "image": datasets.Image(decode=False),
        "image_path": Value("string"),
        "captions": _ListFeature(Value("string")),
        "metadata": Value("string"),
    }
)
JSON_READ_THREADS = 16  # reading many small json files is I/O bound

# Per-process record of images that failed to decode, so each one is warned about once.
_WARNED_IMAGES: set[str] = set()


def _is_main_local_process() -> bool:
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
        if _is_main_local_process():
            logger.warning(f"Skipping {what}: {reason}")

    def summarize(self, kept: int) -> None:
        self.kept = kept
        skipped = self.skipped
        if skipped and _is_main_local_process():
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


def _image_label(value: dict | None, fallback: str) -> str:
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
            label = _image_label(value, "image")
            if label not in _WARNED_IMAGES:
                _WARNED_IMAGES.add(label)
                logger.warning(f"Skipping sample: cannot decode image {label}: {error}")
        images.append(image)
    return {"image": images}


def _finalize(dataset: Dataset) -> Dataset:
    # Only the image column goes through the transform; the others are returned as stored.
    return dataset.with_transform(decode_images_transform, columns=["image"], output_all_columns=True)


def _from_rows(rows: list[dict]) -> Dataset:
    columns = {name: [row[name] for row in rows] for name in FEATURES}
    return Dataset.from_dict(columns, features=FEATURES)


def _clean_captions(captions: Any) -> list[str] | None:
    """A list of non-empty caption strings; a single string counts as one caption. `None` when there is none."""
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, (list, tuple)):
        return None
    cleaned = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
    return cleaned or None


def _caption_problem(captions: Any) -> str | None:
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


def _image_value(path: Path) -> dict:
    return {"path": str(path), "bytes": None}


# ---------------------------------------------------------------------------------------------------------------------
# The original layout


def _find_image_by_stem(data_dir: Path, json_path: Path) -> Path | None:
    """The original's rule for a json without `image_path`: `images/<same sub-folder>/<stem>.jpg`; else beside it."""
    relative_folder = json_path.parent.relative_to(data_dir / "image_data")
    for folder in (data_dir / "images" / relative_folder, json_path.parent):
        for extension in IMAGE_EXTENSIONS:
            for candidate in (folder / (json_path.stem + extension), folder / (json_path.stem + extension.upper())):
                if candidate.is_file():
                    return candidate
    return None


def _read_sample_json(data_dir: Path, json_path: Path) -> dict | tuple[str, str]:
    """One row of the original layout, or `(what, reason)` when the sample must be skipped."""
    try:
        with open(json_path, encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, ValueError) as error:
        return str(json_path), f"unreadable json: {type(error).__name__}: {error}"
    if not isinstance(data, dict):
        return str(json_path), f"unreadable json: expected an object, got {type(data).__name__}"
    problem = _caption_problem(data.get("captions"))
    if problem:
        return str(json_path), f"bad captions: {problem}"
    captions = _clean_captions(data.get("captions"))
    if captions is None:
        return str(json_path), "no captions: 'captions' must be a non-empty list of non-empty strings"
    if data.get("image_path"):
        image_path = data_dir / data["image_path"]
        if not image_path.is_file():
            return str(json_path), f"missing image: {image_path} does not exist"
    else:
        image_path = _find_image_by_stem(data_dir, json_path)
        if image_path is None:
            return str(json_path), f"missing image: no 'image_path' and no image named {json_path.stem}.* found"
    image_path = image_path.resolve()
    metadata = data.get("metadata")
    return {
        "image": _image_value(image_path),
        "image_path": str(image_path),
        "captions": captions,
        "metadata": json.dumps(metadata if metadata is not None else {}, default=str),
    }


def _read_original_layout(data_dir: str | os.PathLike) -> Dataset:
    data_dir = Path(data_dir).expanduser().resolve()
    image_data_dir = data_dir / "image_data"
    if not image_data_dir.is_dir() and (data_dir / STAGING_FOLDER).is_dir():
        raise FileNotFoundError(
            f"{data_dir} holds no dataset yet: a convert_dataset into it was interrupted ({data_dir / STAGING_FOLDER} "
            "is left). Call convert_dataset again with the same data_dir, mode and dir_size to finish it."
        )
    if not image_data_dir.is_dir():
        raise FileNotFoundError(
            f"{data_dir} is not a dataset in the MAGMA layout: it has no image_data/ folder "
            "(expected images/** and image_data/**/*.json)"
        )
    json_paths = sorted(image_data_dir.rglob("*.json"))
    if not json_paths:
        raise FileNotFoundError(f"{image_data_dir} holds no *.json sample files")
    report = SkipReport(str(data_dir))
    rows = []
    with ThreadPoolExecutor(JSON_READ_THREADS) as pool:
        results = pool.map(lambda path: _read_sample_json(data_dir, path), json_paths)
        for result in tqdm(
            results, total=len(json_paths), desc=f"Reading {data_dir.name}", disable=not _is_main_local_process()
        ):
            if isinstance(result, tuple):
                report.skip(*result)
            else:
                rows.append(result)
    report.summarize(len(rows))
    if not rows:
        raise ValueError(f"{data_dir}: none of the {len(json_paths)} samples is usable (see the warnings above)")
    return _from_rows(rows)


def load_magma_dataset(data_dir: str | os.PathLike | Sequence[str | os.PathLike]) -> Dataset:
    """Read a dataset in the original MAGMA layout (or several, concatenated in order).

    Args:
        data_dir: A folder with `images/` and `image_data/`, or a list of them.

    Returns:
        A `datasets.Dataset` with `image` (PIL, decoded on access; `None` if undecodable), `image_path`, `captions`,
        `metadata` (JSON string). Samples are ordered by json path, as the original read them.

    Example:

    ```python
    >>> from magma_hf.training.data import load_magma_dataset
    >>> ds = load_magma_dataset("/data/coco_converted")
    >>> ds[0]["captions"], ds[0]["image"].size
    ```
    """
    if isinstance(data_dir, (str, os.PathLike)):
        return _finalize(_read_original_layout(data_dir))
    return _finalize(concatenate_datasets([_read_original_layout(d) for d in data_dir]))


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face datasets


def _guess_caption_column(column_names: Sequence[str]) -> str:
    for name in CAPTION_COLUMNS:
        if name in column_names:
            return name
    raise ValueError(f"No caption column found among {list(column_names)}: pass caption_column= (one of the columns)")


def _to_magma_columns(image_column: str, caption_column: str, extra_columns: list[str]):
    def convert(batch: dict[str, list]) -> dict[str, list]:
        images = batch[image_column]
        metadata = [
            json.dumps({name: batch[name][n] for name in extra_columns}, default=str) for n in range(len(images))
        ]
        return {
            "image": images,
            "image_path": [
                str(Path(value["path"]).resolve()) if value.get("path") and os.path.isfile(value["path"]) else ""
                for value in images
            ],
            "captions": [_clean_captions(captions) for captions in batch[caption_column]],
            "metadata": metadata,
        }

    return convert


def from_hf_dataset(
    dataset: Dataset, image_column: str = "image", caption_column: str | None = None, source: str | None = None
) -> Dataset:
    """Bring a Hugging Face image-caption dataset to the MAGMA columns.

    Args:
        dataset: A `datasets.Dataset` with an image column (a `datasets.Image` feature, or `{"path", "bytes"}`
            structs) and a caption column (a string or a list of strings per row), e.g.
            `load_dataset("imagefolder", data_dir=...)` with the captions in `metadata.jsonl`.
        image_column: The image column.
        caption_column: The caption column; by default the first of `text`, `caption`, `captions`, `txt` present.
        source: A name for the warnings.

    The other columns go into `metadata` (as JSON). Rows without a caption or whose image file is missing are dropped,
    with one warning each and a summary.
    """
    if isinstance(dataset, datasets.DatasetDict):
        raise TypeError(f"Got a DatasetDict with splits {list(dataset)}: pass one split, e.g. dataset['train']")
    caption_column = caption_column or _guess_caption_column(dataset.column_names)
    for name, role in ((image_column, "image_column"), (caption_column, "caption_column")):
        if name not in dataset.column_names:
            raise ValueError(f"{role}={name!r} is not a column of the dataset; columns: {dataset.column_names}")
    source = source or (dataset.info.dataset_name or "dataset")
    dataset = dataset.with_format(None).cast_column(image_column, datasets.Image(decode=False))

    report = SkipReport(source)
    keep = []
    rows = dataset.select_columns([image_column, caption_column])
    for start in tqdm(
        range(0, len(rows), 1000), desc=f"Checking {source}", unit="k rows", disable=not _is_main_local_process()
    ):
        batch = rows[start : start + 1000]
        for offset, (image, captions) in enumerate(zip(batch[image_column], batch[caption_column])):
            index = start + offset
            what = _image_label(image, f"{source} row {index}")
            problem = _caption_problem(captions)
            if problem:
                report.skip(what, f"bad captions: {problem}")
            elif _clean_captions(captions) is None:
                report.skip(what, "no captions")
            elif not image or (
                image.get("bytes") is None and not (image.get("path") and os.path.isfile(image["path"]))
            ):
                report.skip(what, "missing image: no bytes and no existing file")
            else:
                keep.append(index)
    report.summarize(len(keep))
    if not keep:
        raise ValueError(f"{source}: none of the {len(dataset)} rows is usable (see the warnings above)")
    if len(keep) < len(dataset):
        dataset = dataset.select(keep)
    extra_columns = [name for name in dataset.column_names if name not in (image_column, caption_column)]
    dataset = dataset.map(
        _to_magma_columns(image_column, caption_column, extra_columns),
        batched=True,
        remove_columns=dataset.column_names,
        features=FEATURES,
        desc=f"Converting {source}",
    )
    return _finalize(dataset)


def load_imagefolder(data_dir: str | os.PathLike, caption_column: str | None = None, split: str = "train") -> Dataset:
    """`load_dataset("imagefolder", data_dir=...)` (captions in `metadata.jsonl` / `metadata.csv` beside the images),
    brought to the MAGMA columns by [`from_hf_dataset`]."""
    try:
        dataset = datasets.load_dataset("imagefolder", data_dir=str(data_dir), split=split)
    except datasets.exceptions.DatasetGenerationError as error:  # says only "An error occurred while generating"
        if not isinstance(error.__cause__, UnicodeDecodeError):
            raise
        metadata = sorted(p for p in Path(data_dir).rglob("metadata.*") if p.suffix in (".jsonl", ".csv", ".json"))
        problems = (_utf8_problem(path.read_bytes(), str(path)) for path in metadata)
        raise ValueError(next((p for p in problems if p), f"{data_dir}: {error.__cause__}")) from None
    return from_hf_dataset(dataset, image_column="image", caption_column=caption_column, source=str(data_dir))


# ---------------------------------------------------------------------------------------------------------------------
# img2dataset


def _img2dataset_sample(image_path: Path) -> tuple[dict, list[str] | None, str | None]:
    """Metadata (the `.json` beside the image), captions (the `.txt`, else the json's `caption`) and, when the
    captions cannot be read as text, why."""
    metadata: dict = {}
    json_path = image_path.with_suffix(".json")
    if json_path.is_file():
        try:
            with open(json_path, encoding="utf-8") as file:
                loaded = json.load(file)
            metadata = loaded if isinstance(loaded, dict) else {"value": loaded}
        except (OSError, ValueError) as error:
            logger.warning(f"Ignoring unreadable metadata {json_path}: {error}")
    text_path = image_path.with_suffix(".txt")
    captions = None
    if text_path.is_file():
        raw = text_path.read_bytes()
        problem = _utf8_problem(raw, str(text_path))
        if problem:
            return metadata, None, f"bad captions: {problem}"
        captions = _clean_captions(raw.decode("utf-8"))
    if captions is None:
        problem = _caption_problem(metadata.get("caption"))
        if problem:
            return metadata, None, f"bad captions: the 'caption' of {json_path}: {problem}"
        captions = _clean_captions(metadata.get("caption"))
    return metadata, captions, None


def iter_img2dataset(data_dir: str | os.PathLike) -> Iterator[tuple[Path, dict]]:
    """Yield `(image_path, {"captions": [...], "metadata": {...}})` for img2dataset output in the `files` format
    (`00000/000000123.jpg` beside `000000123.txt` and `000000123.json`), ready for [`convert_dataset`].

    Samples without a caption are skipped with a warning each.
    """
    data_dir = Path(data_dir)
    report = SkipReport(str(data_dir))
    kept = 0
    for image_path in sorted(p for p in data_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        metadata, captions, problem = _img2dataset_sample(image_path)
        if captions is None:
            report.skip(str(image_path), problem or "no captions: no .txt beside it and no 'caption' in its .json")
            continue
        kept += 1
        yield image_path, {"captions": captions, "metadata": metadata}
    report.summarize(kept)


def _utf8_problem(raw: bytes, name: str) -> str | None:
    """`None` for valid UTF-8, else where it is not: the file, its line and byte, and the offending byte."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        byte = raw[error.start : error.start + 1]
        return f"{name} is not valid UTF-8 (line {line}, byte {error.start}: {byte!r}): fix or remove that sample"
    return None


def _first_undecodable_text(tars: Sequence[str]) -> str | None:
    """The first `.txt` / `.json` member of the shards that is not valid UTF-8, named with its shard and byte."""
    for tar_path in tars:
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith((".txt", ".json")):
                    problem = _utf8_problem(tar.extractfile(member).read(), f"{member.name} in {tar_path}")
                    if problem:
                        return problem
    return None


def load_img2dataset(data_dir: str | os.PathLike) -> Dataset:
    """Read img2dataset output: the `files` format (`000.jpg` beside `000.txt` / `000.json`, in shard folders) or the
    `webdataset` format (`*.tar` shards, read with the `webdataset` builder of `datasets`)."""
    data_dir = Path(data_dir).expanduser().resolve()
    tars = sorted(str(p) for p in data_dir.rglob("*.tar"))
    if tars:
        try:
            dataset = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train")
        except UnicodeDecodeError as error:  # raised from deep inside the webdataset builder, naming no file
            raise ValueError(f"{data_dir}: {_first_undecodable_text(tars) or error}") from None
        image_column = next((ext for ext in ("jpg", "jpeg", "png", "webp") if ext in dataset.column_names), None)
        if image_column is None:
            raise ValueError(f"{data_dir}: the tar shards hold no jpg/jpeg/png/webp entries: {dataset.column_names}")
        if "txt" not in dataset.column_names:
            if "json" not in dataset.column_names:
                raise ValueError(f"{data_dir}: the tar shards hold neither .txt captions nor .json metadata")
            dataset = dataset.map(lambda row: {"txt": (row["json"] or {}).get("caption")}, desc="Reading captions")
        return from_hf_dataset(dataset, image_column=image_column, caption_column="txt", source=str(data_dir))
    rows = []
    for image_path, data in tqdm(
        iter_img2dataset(data_dir), desc=f"Reading {data_dir.name}", disable=not _is_main_local_process()
    ):
        rows.append(
            {
                "image": _image_value(image_path.resolve()),
                "image_path": str(image_path.resolve()),
                "captions": data["captions"],
                "metadata": json.dumps(data["metadata"], default=str),
            }
        )
    if not rows:
        raise ValueError(f"{data_dir}: no image with a caption found (img2dataset layout: 000.jpg beside 000.txt)")
    return _finalize(_from_rows(rows))


# ---------------------------------------------------------------------------------------------------------------------
# Any source


def _has_any(path: Path, patterns: Sequence[str]) -> bool:
    return any(next(path.glob(prefix + pattern), None) is not None for prefix in ("", "*/") for pattern in patterns)


def detect_layout(path: str | os.PathLike) -> str:
    """`"magma"` (images/ + image_data/), `"hf_saved"` (`Dataset.save_to_disk`), `"img2dataset"` (images beside
    .txt/.json, or .tar shards) or `"imagefolder"` (images with a metadata.jsonl/.csv)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Dataset folder {path} does not exist")
    if (path / "image_data").is_dir():
        return "magma"
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        return "hf_saved"
    # Look two levels deep only: a full walk of a large dataset just to name its layout would take minutes.
    if _has_any(path, ("metadata.jsonl", "metadata.csv")):
        return "imagefolder"
    if _has_any(path, ("*.tar", "*.txt")):
        return "img2dataset"
    raise ValueError(
        f"Cannot tell the layout of {path}: expected the MAGMA layout (image_data/ and images/), a saved Hugging Face "
        "dataset, an imagefolder (images + metadata.jsonl with a caption column) or img2dataset output (000.jpg "
        "beside 000.txt, or .tar shards)"
    )


def load_image_caption_dataset(source: str | os.PathLike | dict | Dataset | Sequence) -> Dataset:
    """Load any supported source into the MAGMA columns; a list of sources is concatenated.

    A source is a `datasets.Dataset`, a folder (its layout is detected, see [`detect_layout`]), or a dict
    `{"path": ..., "format": "magma" | "imagefolder" | "img2dataset" | "hf_saved" | "hub", "image_column": ...,
    "caption_column": ..., "split": ...}` (`"hub"` loads `load_dataset(path, split=split)`).
    """
    if isinstance(source, (list, tuple)):
        loaded = [load_image_caption_dataset(s) for s in source]
        return _finalize(concatenate_datasets([d.with_format(None) for d in loaded]))
    if isinstance(source, Dataset):
        return from_hf_dataset(source)
    options: dict[str, Any] = dict(source) if isinstance(source, dict) else {"path": source}
    unknown = sorted(set(options) - {"path", "format", "image_column", "caption_column", "split"})
    if unknown or "path" not in options:
        raise ValueError(
            f"Dataset source {source!r}: unknown keys {unknown}"
            if unknown
            else f"Dataset source {source!r} has no path"
        )
    path = str(options["path"])
    layout = options.get("format") or detect_layout(path)
    split = options.get("split", "train")
    columns = {"image_column": options.get("image_column", "image"), "caption_column": options.get("caption_column")}
    if layout == "magma":
        return load_magma_dataset(path)
    if layout == "img2dataset":
        return load_img2dataset(path)
    if layout == "imagefolder":
        return load_imagefolder(path, caption_column=columns["caption_column"], split=split)
    if layout == "hf_saved":
        dataset = datasets.load_from_disk(path)
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[split]
        return from_hf_dataset(dataset, source=path, **columns)
    if layout == "hub":
        return from_hf_dataset(datasets.load_dataset(path, split=split), source=path, **columns)
    raise ValueError(
        f"Dataset source {path}: unknown format {layout!r}; expected magma, imagefolder, img2dataset, hf_saved or hub"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Conversion to the original layout
#
# A conversion never leaves a half-written dataset where a reader would take it for a whole one, and never leaves the
# user's images half moved by a failure:
# 1. plan: every sample is checked and its json written under `data_dir/.convert_dataset-partial/`; no image is
#    touched yet, so any failure here (the iterator raises, a bad caption, hash_fn fails) removes that folder and
#    leaves `data_dir` exactly as it was;
# 2. the list of image transfers is written there (`transfers.jsonl`, atomically): from then on a rerun can finish;
# 3. the images are moved (a rename within one file system) or copied (to a temporary name, then renamed); a failure
#    moves the images moved so far back to their sources, then removes the folder;
# 4. `images/` and `image_data/` are renamed into `data_dir`.
# Only a kill during 3 or 4 leaves the folder with its transfer list; the next call finishes that conversion.

STAGING_FOLDER = ".convert_dataset-partial"
TRANSFERS_FILE = "transfers.jsonl"


@dataclass
class ConversionSummary:
    """What [`convert_dataset`] wrote."""

    samples: int  # json files written
    images: int  # image files written (an image shared by several samples counts once)
    skipped: int  # samples dropped (missing image, no captions, corrupt image when hashing)


def _is_sized(iterable: Iterable) -> bool:
    try:
        len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return False
    return True


def _refuse_non_empty(data_dir: Path) -> None:
    for sub in ("images", "image_data"):
        folder = data_dir / sub
        if folder.is_dir() and any(folder.iterdir()):
            raise FileExistsError(
                f"{folder} is not empty: convert_dataset writes a new dataset and never overwrites one. "
                "Choose an empty data_dir."
            )


def _unique_name(name: str, taken: set[str], sample_number: int) -> str:
    """`name`, or `stem-<k>` (then `stem-<k>-<i>`) when a file of that name, in any letter case, is in the folder."""
    path = Path(name)
    candidate, attempt = name, 0
    while candidate.casefold() in taken:
        attempt += 1
        suffix = f"-{sample_number}" if attempt == 1 else f"-{sample_number}-{attempt}"
        candidate = f"{path.stem}{suffix}{path.suffix}"
    return candidate


def _plan_conversion(
    staging: Path, ds_iterator: Iterable, dir_size: int, hash_fn: Callable | None, report: SkipReport
) -> tuple[list[tuple[str, str]], int]:
    """Step 1: check every sample and write its json under `staging`; returns the image transfers and the count.

    No image is touched. Raises `ValueError` naming the sample for a caption that is bytes or not UTF-8 text, data
    that cannot be written as JSON, or a `hash_fn` that fails.
    """
    new_locations: dict[str, tuple[str, str | None]] = {}  # resolved source -> (image_path in the dataset, hash)
    transfers: list[tuple[str, str]] = []
    names_in_folder: set[str] = set()
    image_folder, images_in_folder, n_samples = 0, 0, 0
    total = len(ds_iterator) if _is_sized(ds_iterator) else None  # type: ignore[arg-type]
    for source_index, item in enumerate(tqdm(ds_iterator, total=total, desc="Converting to the MAGMA layout")):
        image_path, data = item
        image_path = Path(image_path)
        what = f"sample {source_index} ({image_path})"
        sample = dict(data)
        problem = _caption_problem(sample.get("captions"))
        if problem:
            raise ValueError(f"{what}: {problem}")
        if _clean_captions(sample.get("captions")) is None:
            report.skip(what, "no captions")
            continue
        key = str(image_path.resolve())  # two spellings of one file are one image (moving it twice would fail)
        if key not in new_locations:
            if not image_path.is_file():
                report.skip(f"sample {source_index}", f"missing image: {image_path} does not exist")
                continue
            image_hash = None
            if hash_fn is not None:
                image, error = decode_image({"path": str(image_path), "bytes": None})
                if image is None:
                    report.skip(what, f"corrupt image: {error}")
                    continue
                try:
                    image_hash = str(hash_fn(image.convert("RGB")))
                except Exception as hash_error:
                    raise ValueError(f"{what}: hash_fn failed: {type(hash_error).__name__}: {hash_error}") from None
            if images_in_folder == dir_size:
                image_folder, images_in_folder = image_folder + 1, 0
                names_in_folder = set()
            name = _unique_name(image_path.name, names_in_folder, n_samples)
            names_in_folder.add(name.casefold())
            images_in_folder += 1
            new_locations[key] = (f"images/{image_folder}/{name}", image_hash)
            transfers.append((os.path.abspath(image_path), new_locations[key][0]))
        sample["image_path"], image_hash = new_locations[key]
        if image_hash is not None:
            sample["metadata"] = {**(sample.get("metadata") or {}), "image_hash": image_hash}
        try:
            json.dumps(sample)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{what}: its data cannot be written as JSON: {error}") from None
        json_folder = staging / "image_data" / str(n_samples // dir_size)
        json_folder.mkdir(parents=True, exist_ok=True)
        write_text_atomically(json_folder / f"{n_samples}.json", json.dumps(sample))
        n_samples += 1
    return transfers, n_samples


def _write_transfers(staging: Path, header: dict, transfers: list[tuple[str, str]]) -> None:
    """Step 2: the transfer list, one `[source, target]` per line after a header; complete or absent."""
    lines = [json.dumps(header)] + [json.dumps(transfer) for transfer in transfers]
    write_text_atomically(staging / TRANSFERS_FILE, "\n".join(lines) + "\n")


def _read_transfers(staging: Path) -> tuple[dict, list[tuple[str, str]]] | None:
    path = staging / TRANSFERS_FILE
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as file:
        lines = file.read().splitlines()
    return json.loads(lines[0]), [tuple(json.loads(line)) for line in lines[1:]]


def _check_free_space(staging: Path, transfers: list[tuple[str, str]], mode: str) -> None:
    """Copies (mode "cp", or moves to another file system) must fit: found out before any image is touched."""
    device = staging.stat().st_dev
    needed = sum(
        os.stat(source).st_size
        for source, _ in transfers
        if os.path.isfile(source) and (mode == "cp" or os.stat(source).st_dev != device)
    )
    free = shutil.disk_usage(staging).free
    if needed > free:
        raise OSError(
            f"convert_dataset must copy {needed / 1e9:.2f} GB of images into {staging.parent}, which has "
            f"{free / 1e9:.2f} GB free; nothing was moved or copied"
        )


def _transfer_image(source: Path, target: Path, mode: str) -> None:
    """Move or copy one image; a `target` that exists is complete (copies are renamed into place when whole)."""
    if target.exists():
        if mode == "mv" and source.exists():  # copied to another file system, killed before the source was removed
            if source.stat().st_size != target.stat().st_size:
                raise OSError(f"{target} and its source {source} differ in size: remove {target} and rerun")
            source.unlink()
        return
    if not source.is_file():
        raise FileNotFoundError(f"{source} is gone: it was to become {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    if mode == "mv":
        try:
            os.rename(source, target)  # one file system: nothing copied, nothing half-written
            return
        except OSError as error:
            if error.errno != errno.EXDEV:
                raise
    _copy_into_place(source, target)
    if mode == "mv":
        source.unlink()


def _copy_into_place(source: Path, target: Path) -> None:
    """Copy under a unique temporary name beside `target` (never one of the dataset's names), then rename."""
    with atomic_path(target) as temporary:
        shutil.copy2(source, temporary)


def _transfer_images(
    staging: Path, transfers: list[tuple[str, str]], mode: str, done: list, resuming: bool = False
) -> None:
    """Step 3 (also when finishing an interrupted conversion, `resuming`: the transfers already done are skipped, and
    copies a kill cut short are removed)."""
    published = staging.parent / "images"
    if not (staging / "images").exists() and published.is_dir() and any(published.iterdir()):
        return  # killed after images/ was renamed into data_dir (it was empty or absent before): all transfers done
    for source, target in tqdm(transfers, desc="Moving images" if mode == "mv" else "Copying images"):
        if resuming and not (staging / target).exists() and (staging / target).parent.is_dir():
            remove_leftover_temporaries(staging / target)  # a copy cut short by a kill
        _transfer_image(Path(source), staging / target, mode)
        done.append((source, target))


def _undo_transfers(staging: Path, done: list[tuple[str, str]], mode: str) -> None:
    """Put every image moved by this call back at its source, and delete the copies it made (its own files)."""
    for source, target in reversed(done):
        if not (staging / target).exists():
            continue
        if mode == "mv" and not os.path.exists(source):
            shutil.move(str(staging / target), source)
        elif mode == "cp" and os.path.exists(source):
            (staging / target).unlink()


def _remove_staging(staging: Path) -> None:
    """Remove the folder of a conversion, after checking that it holds none of the user's images."""
    images = [path for path in (staging / "images").rglob("*") if path.is_file()] if staging.exists() else []
    if images:
        raise RuntimeError(f"{staging} still holds {len(images)} images (e.g. {images[0]}); it was not removed")
    if staging.exists():
        shutil.rmtree(staging)


def _publish(data_dir: Path, staging: Path) -> None:
    """Step 4: `images/` first, then `image_data/` (a reader sees a dataset only once its images are in place)."""
    for sub in ("images", "image_data"):
        if (staging / sub).exists():
            if (data_dir / sub).exists():
                (data_dir / sub).rmdir()  # empty: checked before the conversion started
            os.rename(staging / sub, data_dir / sub)
    (staging / TRANSFERS_FILE).unlink(missing_ok=True)
    staging.rmdir()


def _finish_interrupted(data_dir: Path, staging: Path, mode: str, dir_size: int) -> ConversionSummary | None:
    """A conversion killed before: discard it if it had not touched an image yet, else finish it."""
    recorded = _read_transfers(staging)
    if recorded is None:
        logger.warning(f"Removing {staging}: a conversion interrupted before it moved any image; starting again")
        _remove_staging(staging)
        return None
    header, transfers = recorded
    if (header["mode"], header["dir_size"]) != (mode, dir_size):
        raise ValueError(
            f"{data_dir} holds a conversion interrupted while transferring its images, started with "
            f"mode={header['mode']!r}, dir_size={header['dir_size']}; rerun with those to finish it "
            f"(this call has mode={mode!r}, dir_size={dir_size})"
        )
    logger.warning(
        f"{data_dir} holds a conversion interrupted while transferring its {len(transfers)} images: finishing it "
        "(ds_iterator is not read)"
    )
    _transfer_images(staging, transfers, mode, [], resuming=True)
    _publish(data_dir, staging)
    return ConversionSummary(**header["summary"])


def convert_dataset(
    data_dir: str | os.PathLike,
    ds_iterator: Iterable[tuple[str | os.PathLike, dict]],
    dir_size: int = 10000,
    hash_fn: Callable[[PIL.Image.Image], Any] | None = None,
    mode: str = "mv",
) -> ConversionSummary:
    """Write a dataset in the original MAGMA layout, as the original `convert_dataset` did.

    Args:
        data_dir: The new dataset's folder; its `images/` and `image_data/` must be empty or absent.
        ds_iterator: Yields `(image_path, {"captions": [...], "metadata": {...}})`; any other keys of the dict are kept
            in the json.
        dir_size: At most this many images per `images/N/` folder and jsons per `image_data/N/` folder.
        hash_fn: Called on each image (PIL, RGB, decoded as training sees it: EXIF orientation applied);
            `str(hash_fn(image))` is stored as `metadata["image_hash"]` (e.g. `imagehash.phash`).
        mode: `"mv"` moves the image files, `"cp"` copies them.

    Layout, as the original's:
    - sample number `k` (from 0, in iteration order) is `image_data/{k // dir_size}/{k}.json`, holding the sample's
      dict plus `"image_path": "images/{n}/{file name}"`;
    - images go to `images/0/`, `images/1/`, ... in order of first appearance, `dir_size` distinct images per folder;
      a file named by several samples is written once and all of them point to it (and share its hash).

    All or nothing: the dataset is written under `data_dir/.convert_dataset-partial/` and renamed into place when
    complete, and images are moved only once every sample has been checked and written. A failure (the iterator
    raises, a caption is bytes, `hash_fn` fails, an image cannot be moved) leaves `data_dir` and every source image
    as they were: images already moved are moved back. A run killed while moving images leaves that folder with its
    list of transfers; calling `convert_dataset` again with the same `data_dir`, `mode` and `dir_size` finishes it.

    Where this differs from the original, on purpose: the last, partial `image_data` folder is numbered like the others
    (the original named its files from `k + 1 - dir_size`), a sample whose image is missing or has no caption is
    skipped with a warning instead of failing or being written, an image that `hash_fn` cannot decode is skipped
    instead of written without hash, a caption that is bytes or not valid UTF-8 is an error naming the sample, two
    different images with the same file name in one folder get distinct names (`name-<k>.jpg`, never a name already
    written) instead of one overwriting the other, and an existing dataset in `data_dir` is an error instead of being
    overwritten.
    """
    if mode not in ("mv", "cp"):
        raise ValueError(f"mode must be 'mv' (move the images) or 'cp' (copy them), got {mode!r}")
    if not isinstance(dir_size, int) or dir_size < 1:
        raise ValueError(f"dir_size must be a positive integer, got {dir_size!r}")
    data_dir = Path(data_dir)
    staging = data_dir / STAGING_FOLDER
    if staging.exists():
        finished = _finish_interrupted(data_dir, staging, mode, dir_size)
        if finished is not None:
            return finished
    _refuse_non_empty(data_dir)
    created_data_dir = not data_dir.exists()
    staging.mkdir(parents=True)
    report = SkipReport(f"convert_dataset({data_dir})")
    try:
        transfers, n_samples = _plan_conversion(staging, ds_iterator, dir_size, hash_fn, report)
        _check_free_space(staging, transfers, mode)
        summary = ConversionSummary(samples=n_samples, images=len(transfers), skipped=report.skipped)
        _write_transfers(staging, {"mode": mode, "dir_size": dir_size, "summary": vars(summary)}, transfers)
    except BaseException as error:
        _remove_staging(staging)
        if created_data_dir and not any(data_dir.iterdir()):
            data_dir.rmdir()
        error.add_note(f"convert_dataset stopped before moving or copying any image: {data_dir} is as it was")
        raise
    done: list[tuple[str, str]] = []
    try:
        _transfer_images(staging, transfers, mode, done)
    except BaseException as error:
        try:
            _undo_transfers(staging, done, mode)
            _remove_staging(staging)
        except Exception as undo_error:
            error.add_note(
                f"Putting the {len(done)} images back failed ({undo_error}): {staging} lists every transfer; "
                "call convert_dataset again with the same data_dir, mode and dir_size to finish the conversion"
            )
            raise error from undo_error
        undone = "moved the" if mode == "mv" else "deleted the copies of the"
        error.add_note(f"convert_dataset {undone} {len(done)} images it had transferred: {data_dir} is as it was")
        raise
    _publish(data_dir, staging)
    report.summarize(n_samples)
    return summary


__all__ = [
    "ConversionSummary",
    "convert_dataset",
    "decode_image",
    "detect_layout",
    "from_hf_dataset",
    "iter_img2dataset",
    "load_image_caption_dataset",
    "load_imagefolder",
    "load_img2dataset",
    "load_magma_dataset",
]
