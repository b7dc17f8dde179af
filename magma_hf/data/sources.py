"""Map-style readers of image-caption data: the original MAGMA layout, Hugging Face datasets, imagefolder and
img2dataset output, and the one layout detector ([`detect_layout`]) that every command uses to tell them apart.

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

import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, Features, Value, concatenate_datasets
from tqdm.auto import tqdm
from transformers.utils import logging

from .convert import STAGING_FOLDER
from .decoding import (
    IMAGE_EXTENSIONS,
    SkipReport,
    caption_problem,
    clean_captions,
    decode_images_transform,
    image_label,
    is_main_local_process,
    name_problem,
    shown_path,
    utf8_problem,
)
from .shards import CAPTION_KEYS, IMAGE_KEYS, is_shard_spec, list_shards, shard_format

try:  # datasets >= 4
    from datasets import List as _ListFeature
except ImportError:  # pragma: no cover - datasets 3.x
    from datasets import Sequence as _ListFeature

logger = logging.get_logger(__name__)

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


def _finalize(dataset: Dataset) -> Dataset:
    # Only the image column goes through the transform; the others are returned as stored.
    return dataset.with_transform(decode_images_transform, columns=["image"], output_all_columns=True)


def _from_rows(rows: list[dict]) -> Dataset:
    columns = {name: [row[name] for row in rows] for name in FEATURES}
    return Dataset.from_dict(columns, features=FEATURES)


def _file_row(image_path: Path, captions: list[str], metadata: Any) -> dict:
    """The row of an image file (a resolved path) with its captions and metadata (`None`: `{}`)."""
    return {
        "image": {"path": str(image_path), "bytes": None},
        "image_path": str(image_path),
        "captions": captions,
        "metadata": json.dumps(metadata if metadata is not None else {}, default=str),
    }


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
        return shown_path(json_path), f"unreadable json: {type(error).__name__}: {error}"
    if not isinstance(data, dict):
        return shown_path(json_path), f"unreadable json: expected an object, got {type(data).__name__}"
    problem = caption_problem(data.get("captions"))
    if problem:
        return shown_path(json_path), f"bad captions: {problem}"
    captions = clean_captions(data.get("captions"))
    if captions is None:
        return shown_path(json_path), "no captions: 'captions' must be a non-empty list of non-empty strings"
    if data.get("image_path"):
        image_path = data_dir / data["image_path"]
        if not image_path.is_file():
            return shown_path(json_path), f"missing image: {shown_path(image_path)} does not exist"
    else:
        image_path = _find_image_by_stem(data_dir, json_path)
        if image_path is None:
            stem = shown_path(json_path.stem)
            return shown_path(json_path), f"missing image: no 'image_path' and no image named {stem}.* found"
    image_path = image_path.resolve()
    problem = name_problem(image_path)
    if problem:  # Arrow holds UTF-8 strings only
        return shown_path(json_path), f"bad file name: its image {problem}"
    return _file_row(image_path, captions, data.get("metadata"))


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
        bar = tqdm(results, total=len(json_paths), desc=f"Reading {data_dir.name}", disable=not is_main_local_process())
        for result in bar:
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
    >>> from magma_hf.data import load_magma_dataset
    >>> ds = load_magma_dataset("/data/coco_converted")
    >>> ds[0]["captions"], ds[0]["image"].size
    ```
    """
    if isinstance(data_dir, (str, os.PathLike)):
        return _finalize(_read_original_layout(data_dir))
    return _finalize(concatenate_datasets([_read_original_layout(d) for d in data_dir]))


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face datasets


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
            "captions": [clean_captions(captions) for captions in batch[caption_column]],
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
    caption_column = caption_column or next((name for name in CAPTION_COLUMNS if name in dataset.column_names), None)
    if caption_column is None:
        raise ValueError(
            f"No caption column found among {list(dataset.column_names)}: pass caption_column= (one of the columns)"
        )
    for name, role in ((image_column, "image_column"), (caption_column, "caption_column")):
        if name not in dataset.column_names:
            raise ValueError(f"{role}={name!r} is not a column of the dataset; columns: {dataset.column_names}")
    source = source or (dataset.info.dataset_name or "dataset")
    dataset = dataset.with_format(None).cast_column(image_column, datasets.Image(decode=False))

    report = SkipReport(source)
    keep = []
    rows = dataset.select_columns([image_column, caption_column])
    for start in tqdm(
        range(0, len(rows), 1000), desc=f"Checking {source}", unit="k rows", disable=not is_main_local_process()
    ):
        batch = rows[start : start + 1000]
        for offset, (image, captions) in enumerate(zip(batch[image_column], batch[caption_column])):
            index = start + offset
            what = image_label(image, f"{source} row {index}")
            problem = caption_problem(captions)
            if problem:
                report.skip(what, f"bad captions: {problem}")
            elif clean_captions(captions) is None:
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
        problems = (utf8_problem(path.read_bytes(), str(path)) for path in metadata)
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
        problem = utf8_problem(raw, str(text_path))
        if problem:
            return metadata, None, f"bad captions: {problem}"
        captions = clean_captions(raw.decode("utf-8"))
    if captions is None:
        problem = caption_problem(metadata.get("caption"))
        if problem:
            return metadata, None, f"bad captions: the 'caption' of {json_path}: {problem}"
        captions = clean_captions(metadata.get("caption"))
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
        if name_problem(image_path):  # Arrow and the converter's json hold UTF-8 only
            report.skip(shown_path(image_path), "bad file name: not valid UTF-8 (rename it)")
            continue
        metadata, captions, problem = _img2dataset_sample(image_path)
        if captions is None:
            report.skip(str(image_path), problem or "no captions: no .txt beside it and no 'caption' in its .json")
            continue
        kept += 1
        yield image_path, {"captions": captions, "metadata": metadata}
    report.summarize(kept)


def _first_undecodable_text(tars: Sequence[str]) -> str | None:
    """The first `.txt` / `.json` member of the shards that is not valid UTF-8, named with its shard and byte."""
    for tar_path in tars:
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith((".txt", ".json")):
                    problem = utf8_problem(tar.extractfile(member).read(), f"{member.name} in {tar_path}")
                    if problem:
                        return problem
    return None


def load_img2dataset(data_dir: str | os.PathLike, shards: Sequence[str] | None = None) -> Dataset:
    """Read img2dataset output map-style: the `files` format (`000.jpg` beside `000.txt` / `000.json`, in shard
    folders) or the `webdataset` format (`*.tar` shards, or the given `shards`, read with the `webdataset` builder of
    `datasets`, which copies them into its cache: `magma_hf.data.streaming` reads them where they lie)."""
    data_dir = Path(data_dir).expanduser().resolve() if shards is None else Path(os.fspath(data_dir))
    tars = sorted(str(p) for p in data_dir.rglob("*.tar")) if shards is None else list(shards)
    if tars:
        try:
            dataset = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train")
        except UnicodeDecodeError as error:  # raised from deep inside the webdataset builder, naming no file
            raise ValueError(f"{data_dir}: {_first_undecodable_text(tars) or error}") from None
        image_column = next((ext for ext in IMAGE_KEYS if ext in dataset.column_names), None)
        if image_column is None:
            raise ValueError(f"{data_dir}: the tar shards hold no jpg/jpeg/png/webp entries: {dataset.column_names}")
        if "txt" not in dataset.column_names:
            if "json" not in dataset.column_names:
                raise ValueError(f"{data_dir}: the tar shards hold neither .txt captions nor .json metadata")
            dataset = dataset.map(lambda row: {"txt": (row["json"] or {}).get("caption")}, desc="Reading captions")
        return from_hf_dataset(dataset, image_column=image_column, caption_column="txt", source=str(data_dir))
    samples = tqdm(iter_img2dataset(data_dir), desc=f"Reading {data_dir.name}", disable=not is_main_local_process())
    rows = [_file_row(image_path.resolve(), data["captions"], data["metadata"]) for image_path, data in samples]
    if not rows:
        raise ValueError(f"{data_dir}: no image with a caption found (img2dataset layout: 000.jpg beside 000.txt)")
    logger.info(f"{data_dir}: read as img2dataset `files` output: {len(rows)} images with captions")
    return _finalize(_from_rows(rows))


# ---------------------------------------------------------------------------------------------------------------------
# Any source


def _has_any(path: Path, patterns: Sequence[str]) -> bool:
    return any(next(path.glob(prefix + pattern), None) is not None for prefix in ("", "*/") for pattern in patterns)


PAIR_SAMPLE = 1000  # images looked at to tell img2dataset's `files` output from a folder of photos
CAPTION_SUFFIXES = (".txt", ".json")  # what img2dataset's `files` output writes beside each image


def _images_and_pairs(path: Path, limit: int = PAIR_SAMPLE) -> tuple[int, int]:
    """`(images, paired)`: up to `limit` image files in `path` and its sub-folders (in name order, a folder at a
    time, so a large dataset is not walked whole) and how many of them have a same-stem .txt or .json beside them."""
    images = paired = 0
    folders = [path]
    while folders and images < limit:
        folder = folders.pop(0)
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError:
            continue
        names = {entry.name for entry in entries}
        if folder == path:
            folders += [Path(entry.path) for entry in entries if entry.is_dir()]
        for entry in entries:
            stem, extension = os.path.splitext(entry.name)
            if extension.lower() in IMAGE_EXTENSIONS and images < limit:
                images += 1
                paired += any(stem + suffix in names for suffix in CAPTION_SUFFIXES)
    return images, paired


# The layouts read as streams unless a source says `streaming: false`; folders of files are read map-style.
STREAMED_BY_DEFAULT = ("webdataset", "parquet", "hub")
LAYOUTS = ("magma", "imagefolder", "img2dataset", "hf_saved", "hub", "webdataset", "parquet")
SOURCE_KEYS = ("path", "format", "image_column", "caption_column", "split", "streaming")


def detect_layout(path: str | os.PathLike) -> str:
    """The layout of a dataset source, decided from its name and a look two folder levels deep:

    - `"webdataset"` / `"parquet"`: `.tar` / `.parquet` shards, named by a glob, a brace range, a file, a URL, or a
      folder holding them and no loose images (img2dataset's `webdataset` and `parquet` output; its per-shard
      `.parquet` metadata beside `.tar` shards is not data);
    - `"magma"` (images/ + image_data/), `"hf_saved"` (`Dataset.save_to_disk`), `"imagefolder"` (images with a
      metadata.jsonl/.csv), `"img2dataset"` (its `files` output: most images beside a same-stem .txt/.json, which
      is logged; one stray text file among photos is not that).

    A folder of images that is none of these (photos, perhaps with notes or a README) raises a `ValueError` naming
    what it holds.
    """
    if is_shard_spec(path):
        return shard_format(list_shards(path))
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Dataset folder {shown_path(path)} does not exist")
    if (path / "image_data").is_dir():
        return "magma"
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        return "hf_saved"
    # Look two levels deep only: a full walk of a large dataset just to name its layout would take minutes.
    if _has_any(path, ("metadata.jsonl", "metadata.csv")):
        return "imagefolder"
    images, paired = _images_and_pairs(path)
    if images and 2 * paired > images:  # decided from the pairs, not from one text file among photos
        looked_at = f"the first {images}" if images >= PAIR_SAMPLE else f"the {images}"
        logger.info(
            f"{shown_path(path)}: read as img2dataset `files` output: {paired} of {looked_at} images have a "
            "same-stem .txt or .json beside them"
        )
        return "img2dataset"
    tars = _has_any(path, ("*.tar",))
    if tars and not images:
        return "webdataset"
    if not images and _has_any(path, ("*.parquet",)):
        return "parquet"
    found = f"{images}{'+' if images >= PAIR_SAMPLE else ''} image files ({paired} beside a same-stem .txt or .json)"
    raise ValueError(
        f"Cannot tell the layout of {shown_path(path)}: it holds {found}{' and .tar files' if tars else ''}. "
        "Expected the MAGMA layout (image_data/ and images/), a saved Hugging Face dataset, an imagefolder (images + "
        "metadata.jsonl with a caption column), img2dataset output (most images beside a same-stem caption: 000.jpg "
        "beside 000.txt), or .tar / .parquet shards without loose images; a dataset source in a config may name its "
        "layout with `format:`"
    )


def reads_as_shards(source: str | os.PathLike) -> bool:
    """Whether captioning and evaluation read `source` as shards where they lie ([`shards.ShardIndex`]): a `.tar` /
    `.parquet` file, a glob or brace range of them, a URL, or a folder whose layout is `webdataset` / `parquet` with
    the shards in the folder itself (img2dataset's output). Other folders keep their map-style readers."""
    if is_shard_spec(source):
        return True
    path = Path(source)
    if not path.is_dir():
        return False
    try:
        layout = detect_layout(path)
    except ValueError:  # no dataset layout (e.g. a folder of photos)
        return False
    suffix = {"webdataset": ".tar", "parquet": ".parquet"}.get(layout)
    return suffix is not None and next(path.glob(f"*{suffix}"), None) is not None


@dataclass
class SourceSpec:
    """One dataset source as a config names it: a path (or a dict with these keys), its layout and whether it is
    streamed (default: shards and hub names yes, folders of files no)."""

    path: str
    layout: str
    streaming: bool
    split: str = "train"
    image_column: str | None = None
    caption_column: str | None = None


def parse_source(source: str | os.PathLike | dict, streaming: bool | None = None) -> SourceSpec:
    """A [`SourceSpec`] for a path or a dict `{"path", "format", "image_column", "caption_column", "split",
    "streaming"}`; `streaming` is the default where the source does not say (the config's `streaming` key)."""
    options: dict[str, Any] = dict(source) if isinstance(source, dict) else {"path": source}
    unknown = sorted(set(options) - set(SOURCE_KEYS))
    if unknown:
        raise ValueError(f"Dataset source {source!r}: unknown keys {unknown}; known keys: {list(SOURCE_KEYS)}")
    if options.get("path") is None:
        raise ValueError(f"Dataset source {source!r} has no path")
    path = os.fspath(options["path"])
    layout = options.get("format") or detect_layout(path)
    if layout not in LAYOUTS:
        raise ValueError(f"Dataset source {path}: unknown format {layout!r}; expected one of {', '.join(LAYOUTS)}")
    chosen = options.get("streaming", streaming)
    if chosen is not None and not isinstance(chosen, bool):
        raise ValueError(f"Dataset source {path}: streaming must be true or false, got {chosen!r}")
    return SourceSpec(
        path=path,
        layout=layout,
        streaming=(layout in STREAMED_BY_DEFAULT) if chosen is None else chosen,
        split=options.get("split", "train"),
        image_column=options.get("image_column"),
        caption_column=options.get("caption_column"),
    )


def load_image_caption_dataset(source: str | os.PathLike | dict | Dataset | Sequence) -> Dataset:
    """Load any supported source into the MAGMA columns, map-style (`datasets.Dataset`); a list is concatenated.

    A source is a `datasets.Dataset`, a path (its layout is detected, see [`detect_layout`]), or a dict
    `{"path": ..., "format": "magma" | "imagefolder" | "img2dataset" | "hf_saved" | "hub" | "webdataset" |
    "parquet", "image_column": ..., "caption_column": ..., "split": ...}` (`"hub"` loads
    `load_dataset(path, split=split)`). Shards read this way are copied into the 🤗 datasets cache first: stream them
    instead (`magma_hf.data.streaming`), as training does by default.
    """
    if isinstance(source, (list, tuple)):
        loaded = [load_image_caption_dataset(s) for s in source]
        return _finalize(concatenate_datasets([d.with_format(None) for d in loaded]))
    if isinstance(source, Dataset):
        return from_hf_dataset(source)
    spec = parse_source(source, streaming=False)
    path, split = spec.path, spec.split
    columns = {"image_column": spec.image_column or "image", "caption_column": spec.caption_column}
    if spec.layout == "magma":
        return load_magma_dataset(path)
    if spec.layout == "img2dataset" or (spec.layout == "webdataset" and Path(path).is_dir()):
        return load_img2dataset(path)
    if spec.layout == "webdataset":
        return load_img2dataset(path, shards=list_shards(path))
    if spec.layout == "parquet":
        return _load_parquet(path, spec)
    if spec.layout == "imagefolder":
        return load_imagefolder(path, caption_column=columns["caption_column"], split=split)
    if spec.layout == "hf_saved":
        dataset = datasets.load_from_disk(path)
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[split]
        return from_hf_dataset(dataset, source=path, **columns)
    return from_hf_dataset(datasets.load_dataset(path, split=split), source=path, **columns)


def _load_parquet(path: str, spec: SourceSpec) -> Dataset:
    """img2dataset's parquet output, map-style: the rows it downloaded (`status` "success"), image bytes as images."""
    dataset = datasets.load_dataset("parquet", data_files={"train": list_shards(path)}, split="train")
    if "status" in dataset.column_names:
        dataset = dataset.filter(lambda status: status == "success", input_columns="status")
    names = dataset.column_names
    image_column = spec.image_column or next((c for c in (*IMAGE_KEYS, "image") if c in names), "image")
    caption_column = spec.caption_column or next((c for c in CAPTION_KEYS if c in names), None)
    return from_hf_dataset(dataset, image_column=image_column, caption_column=caption_column, source=path)
