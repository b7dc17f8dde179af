"""Shards read where they lie: webdataset / img2dataset `.tar` shards, parquet shards with image bytes (img2dataset's
`parquet` output), a 🤗 dataset in streaming mode, and a map-style dataset cut into ranges so it can join a stream.

Each source is a list of shards; [`ShardSource.read`] yields a shard's samples from any position, as [`RawSample`]s
(image bytes, raw captions, metadata): nothing is copied, extracted or cached. `magma_hf.data.streaming` builds the
training stream on them; [`ShardIndex`] gives random access to their samples for captioning and evaluation.

Shards are named as webdataset and img2dataset name them: a folder (its `*.tar`, else its `*.parquet`), a glob
(`data/*.tar`) or a brace range (`data/{00000..09999}.tar`), local or any fsspec URL (`s3://...`, `https://...`).
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import PIL.Image
from fsspec.implementations.local import LocalFileSystem
from tqdm.auto import tqdm
from transformers.utils import logging

from .decoding import decode_image, is_main_local_process, utf8_problem

logger = logging.get_logger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # webdataset's member extensions / img2dataset's encode_format columns
CAPTION_KEYS = ("txt", "caption", "text", "captions")
SHARD_SUFFIXES = (".tar", ".parquet")
_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_BRACE_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")


@dataclass(frozen=True)
class ImageRef:
    """Where a sample's image is in its shard: a tar member's data offset and size, or a parquet row group and row."""

    shard: int
    offset: int
    size: int


class ShardError(ValueError):
    """A shard that cannot be read: the message names it and what is wrong."""


@dataclass
class RawSample:
    """One sample as a shard holds it; decoding is `magma_hf.data.decoding`'s (see `streaming.decode_sample`).

    `key` is unique within its source (`<shard name>/<sample key>`); `position` is the sample's index in its shard.
    `image` is the image's bytes (or a `{"path", "bytes"}` value for map-style rows); `problem` says why the shard
    could not give a usable sample (a caption that is not UTF-8), `None` otherwise.
    """

    key: str
    position: int
    image: Any
    captions: Any
    metadata: dict = field(default_factory=dict)
    problem: str | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Naming shards


def expand_braces(pattern: str) -> list[str]:
    """`a{00..02}.tar` -> `a00.tar a01.tar a02.tar` (zero-padded as written), `{x,y}` -> both: webdataset's names."""
    match = _BRACE_RANGE.search(pattern) or _BRACE_LIST.search(pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    if match.re is _BRACE_RANGE:
        first, last = match.group(1), match.group(2)
        width = len(first) if first.startswith("0") else 0
        items = [str(n).zfill(width) for n in range(int(first), int(last) + 1)]
    else:
        items = match.group(1).split(",")
    return [name for item in items for name in expand_braces(head + item + tail)]


def is_shard_spec(source: str | os.PathLike) -> bool:
    """Whether `source` names shards (a `.tar` / `.parquet` file, a glob or brace range of them, a URL) rather than a
    folder whose layout `detect_layout` decides."""
    text = str(source)
    return text.endswith(SHARD_SUFFIXES) or "://" in text


def list_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The shard paths of `spec`: a list of specs, a folder (its `*.tar`, else its `*.parquet`, sorted), a glob, a
    brace range, or one file; local paths or fsspec URLs. Every shard of a local brace range must exist (img2dataset
    leaves gaps where a shard failed): a gap is an error naming the first missing ones, not a surprise mid-run."""
    if isinstance(spec, (list, tuple)):
        return [path for item in spec for path in list_shards(item)]
    spec = os.fspath(spec)
    fs, _ = fsspec.core.url_to_fs(spec.split("{")[0] or ".")
    local = isinstance(fs, LocalFileSystem)
    if "{" in spec:
        paths = expand_braces(spec)
        missing = [path for path in paths if local and not os.path.isfile(path)]
        if missing:
            raise FileNotFoundError(
                f"{spec}: {len(missing)} of its {len(paths)} shards do not exist, first {missing[:3]}. Name the shards "
                "that exist (a glob such as data/*.tar, or the folder)"
            )
        return paths
    if any(char in spec for char in "*?["):
        paths = sorted(glob.glob(spec) if local else (fs.unstrip_protocol(p) for p in fs.glob(spec)))
        if not paths:
            raise FileNotFoundError(f"{spec}: no file matches")
        return paths
    if fs.isdir(spec):
        for suffix in SHARD_SUFFIXES:
            paths = sorted(p for p in fs.ls(spec, detail=False) if str(p).endswith(suffix))
            if paths:
                return [p if local else fs.unstrip_protocol(p) for p in paths]
        raise FileNotFoundError(f"{spec} holds no .tar or .parquet shards")
    if not fs.exists(spec):
        raise FileNotFoundError(f"Shard {spec} does not exist")
    return [spec]


def shard_format(paths: Sequence[str]) -> str:
    """`"webdataset"` or `"parquet"`; one source holds one format."""
    kinds = {Path(str(path).split("?")[0]).suffix for path in paths}
    if kinds == {".tar"}:
        return "webdataset"
    if kinds == {".parquet"}:
        return "parquet"
    raise ShardError(f"The shards must be all .tar or all .parquet files, got {sorted(kinds)} (first {paths[0]})")


def _shard_name(path: str) -> str:
    return Path(str(path).split("?")[0]).name


# ---------------------------------------------------------------------------------------------------------------------
# Sources


class ShardSource:
    """A list of shards, each readable from any sample position. Subclasses say how a shard is read."""

    def __init__(self, name: str, shards: Sequence[Any]):
        if not shards:
            raise ShardError(f"{name}: no shards")
        self.name = name
        self.shards = list(shards)

    def __len__(self) -> int:
        return len(self.shards)

    def read(self, shard: int, start: int = 0, images: bool = True) -> Iterator[RawSample]:
        """The samples of shard `shard` from position `start` on; with `images=False` each sample's `image` is an
        [`ImageRef`] (where its bytes are) instead of the bytes, for an index that holds no images."""
        raise NotImplementedError

    def read_image(self, ref: ImageRef) -> bytes:
        """The bytes an [`ImageRef`] of this source points at."""
        raise NotImplementedError


class TarShards(ShardSource):
    """webdataset `.tar` shards: a sample is the consecutive members sharing a key (the member path up to the first dot
    of its file name), as webdataset groups them: `000123.jpg`, `000123.txt`, `000123.json`."""

    def read(self, shard: int, start: int = 0, images: bool = True) -> Iterator[RawSample]:
        with self._open(shard) as file:
            yield from self._samples(shard, file, start, images)

    def read_image(self, ref: ImageRef) -> bytes:
        with self._open(ref.shard) as file:
            file.seek(ref.offset)
            return file.read(ref.size)

    def _open(self, shard: int):
        path = self.shards[shard]
        try:
            return fsspec.open(path, "rb").open()
        except OSError as error:
            raise ShardError(f"Cannot open the shard {path}: {type(error).__name__}: {error}") from None

    def _samples(self, shard: int, file, start: int, images: bool) -> Iterator[RawSample]:
        path = self.shards[shard]
        position, key, members = 0, None, {}
        try:
            archive = tarfile.open(fileobj=file, mode="r|")
        except tarfile.TarError as error:
            raise ShardError(f"Cannot read the shard {path}: not a tar file ({error})") from None
        try:
            for member in archive:
                if not member.isfile():
                    continue
                member_key, extension = _split_member_name(member.name)
                if member_key != key and key is not None:
                    if position >= start:
                        yield _tar_sample(path, key, position, members)
                    position += 1
                    members = {}
                key = member_key
                # A skipped sample's members are not read (tarfile passes over their data), nor an image for an index.
                if position < start:
                    members[extension] = b""
                elif not images and extension in IMAGE_KEYS:
                    members[extension] = ImageRef(shard, member.offset_data, member.size)
                else:
                    members[extension] = archive.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError) as error:
            if position == 0 and key is None:
                raise ShardError(f"Cannot read the shard {path}: {type(error).__name__}: {error}") from None
            if is_main_local_process():
                logger.warning(
                    f"The shard {path} is truncated ({type(error).__name__}: {error}): read its {position} whole "
                    "samples, the last one is cut and skipped"
                )
            return
        if key is not None and position >= start:
            yield _tar_sample(path, key, position, members)


def _split_member_name(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _tar_sample(path: str, key: str, position: int, members: dict[str, bytes]) -> RawSample:
    label = f"{_shard_name(path)}/{key}"
    image = next((members[ext] for ext in IMAGE_KEYS if ext in members), None)
    metadata, problem = {}, None
    if "json" in members:
        problem = utf8_problem(members["json"], f"{label}.json")
        if problem is None:
            try:
                loaded = json.loads(members["json"])
                metadata = loaded if isinstance(loaded, dict) else {"value": loaded}
            except ValueError as error:
                logger.warning(f"Ignoring the unreadable metadata {label}.json: {error}")
    captions = None
    if "txt" in members:
        problem = problem or utf8_problem(members["txt"], f"{label}.txt")
        captions = None if problem else members["txt"].decode("utf-8")
    elif problem is None:
        captions = metadata.get("caption")
    if image is None and problem is None:
        problem = f"missing image: no {'/'.join(IMAGE_KEYS)} member"
    return RawSample(label, position, image, captions, metadata, problem)


class ParquetShards(ShardSource):
    """Parquet shards with the image bytes in a column, as img2dataset's `parquet` output: `jpg` (or `png`, `webp`,
    `image`), `txt` / `caption`, `key`, and its metadata columns. Rows img2dataset failed to download (`status` other
    than `"success"`) are not samples and are passed over."""

    def __init__(
        self, name: str, shards: Sequence[str], image_column: str | None = None, caption_column: str | None = None,
        require_captions: bool = True,
    ):
        super().__init__(name, shards)
        self.image_column, self.caption_column = image_column, caption_column
        self.require_captions = require_captions  # captioning reads shards without captions

    def _open(self, shard: int):
        import pyarrow.parquet as pq

        path = self.shards[shard]
        try:
            parquet = pq.ParquetFile(fsspec.open(path, "rb").open())
        except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ...
            raise ShardError(f"Cannot read the shard {path}: {type(error).__name__}: {error}") from None
        names = parquet.schema_arrow.names
        image_column = self.image_column or next((c for c in (*IMAGE_KEYS, "image") if c in names), None)
        caption_column = self.caption_column or next((c for c in CAPTION_KEYS if c in names), None)
        for role, column in (("image", image_column), ("caption", caption_column)):
            if role == "caption" and column is None and not self.require_captions:
                continue
            if column is None or column not in names:
                raise ShardError(f"The shard {path} has no {role} column {column or ''} (columns: {names})")
        return parquet, image_column, caption_column

    def read(self, shard: int, start: int = 0, images: bool = True) -> Iterator[RawSample]:
        parquet, image_column, caption_column = self._open(shard)
        columns = None if images else [name for name in parquet.schema_arrow.names if name != image_column]
        position = 0
        with parquet:
            for group in range(parquet.num_row_groups):
                rows = parquet.metadata.row_group(group).num_rows
                if position + rows <= start:  # whole row groups before `start` are not read
                    position += rows
                    continue
                table = parquet.read_row_group(group, columns=columns)
                for row_in_group, row in enumerate(table.to_pylist()):
                    if position >= start and row.get("status", "success") == "success":
                        if not images:  # whether the image is there, without reading it
                            row[image_column] = ImageRef(shard, group, row_in_group)
                        yield _parquet_sample(self.shards[shard], position, row, image_column, caption_column)
                    position += 1

    def read_image(self, ref: ImageRef) -> bytes | str | None:
        return self.read_group_images(ref.shard, ref.offset)[ref.size]

    def read_group_images(self, shard: int, group: int) -> list[bytes | str | None]:
        """The images of one row group (a datasets `{"bytes", "path"}` value as its bytes, else its path)."""
        parquet, image_column, _ = self._open(shard)
        with parquet:
            values = parquet.read_row_group(group, columns=[image_column]).column(0).to_pylist()
        return [(v.get("bytes") or v.get("path")) if isinstance(v, dict) else v for v in values]


def _parquet_sample(path: str, position: int, row: dict, image_column: str, caption_column: str | None) -> RawSample:
    key = row.get("key") or str(position)
    label = f"{_shard_name(path)}/{key}"
    image = row.pop(image_column)
    if isinstance(image, dict):  # a datasets Image struct {"bytes", "path"}
        image = image.get("bytes") or image.get("path")
    captions = row.pop(caption_column) if caption_column else None
    problem = None if image is not None else f"missing image: the {image_column} column is empty"
    metadata = {name: value for name, value in row.items() if not isinstance(value, bytes)}
    return RawSample(label, position, image, captions, metadata, problem)


class HubShards(ShardSource):
    """A 🤗 dataset by name or folder, `load_dataset(..., streaming=True)`: its shards are the stream's `n_shards`,
    each read with `IterableDataset.shard` (and `skip` to resume)."""

    def __init__(self, path: str, split: str = "train", image_column: str = "image", caption_column: str | None = None):
        import datasets

        try:
            stream = datasets.load_dataset(path, split=split, streaming=True)
        except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
            raise ShardError(f"Cannot stream the dataset {path} (split {split}): {error}") from None
        names = list(stream.features or {}) if stream.features else None
        caption_column = caption_column or next((c for c in CAPTION_KEYS if names and c in names), None)
        for role, column in (("image_column", image_column), ("caption_column", caption_column)):
            if names is not None and column not in names:
                raise ShardError(f"{path}: {role}={column!r} is not a column of the dataset; columns: {names}")
        if isinstance((stream.features or {}).get(image_column), datasets.Image):
            stream = stream.cast_column(image_column, datasets.Image(decode=False))  # MAGMA's one decoder reads it
        self.stream, self.image_column, self.caption_column = stream, image_column, caption_column
        super().__init__(path, list(range(stream.n_shards)))

    def read(self, shard: int, start: int = 0, images: bool = True) -> Iterator[RawSample]:
        part = self.stream.shard(num_shards=len(self), index=shard, contiguous=True)
        if start:
            part = part.skip(start)
        for position, row in enumerate(part, start):
            image = row.pop(self.image_column)
            captions = row.pop(self.caption_column)
            key = f"{shard}/{row.get('key', row.get('__key__', position))}"
            problem = None if image else f"missing image: no value in {self.image_column}"
            metadata = {name: value for name, value in row.items() if not isinstance(value, (bytes, dict))}
            yield RawSample(key, position, image, captions, metadata, problem)


class MapShards(ShardSource):
    """A map-style dataset of `magma_hf.data.sources` (a folder in the MAGMA layout, an imagefolder, ...) cut into
    ranges of `rows_per_shard` rows, so it can join a mix of streams and be sharded over workers like one."""

    def __init__(self, name: str, dataset, rows_per_shard: int = 1000):
        self.rows = dataset.with_format(None)
        starts = range(0, len(self.rows), rows_per_shard)
        super().__init__(name, [(s, min(s + rows_per_shard, len(self.rows))) for s in starts])

    def read(self, shard: int, start: int = 0, images: bool = True) -> Iterator[RawSample]:
        first, end = self.shards[shard]
        for index in range(first + start, end):
            row = self.rows[index]
            key = row["image_path"] or f"{self.name}[{index}]"
            metadata = json.loads(row["metadata"]) if row.get("metadata") else {}
            yield RawSample(key, index - first, row["image"], row["captions"], metadata, None)


def open_shards(
    spec, image_column: str | None = None, caption_column: str | None = None, name: str | None = None,
    require_captions: bool = True,
) -> ShardSource:
    """The [`ShardSource`] of shard files named by `spec` (see [`list_shards`]); `require_captions=False` reads
    parquet shards without a caption column (captioning needs only the images)."""
    paths = list_shards(spec)
    name = name or (spec if isinstance(spec, (str, os.PathLike)) else paths[0])
    if shard_format(paths) == "webdataset":
        return TarShards(str(name), paths)
    return ParquetShards(str(name), paths, image_column, caption_column, require_captions)


# ---------------------------------------------------------------------------------------------------------------------
# Random access, for captioning and evaluation


class ShardIndex:
    """Random access to the samples of tar or parquet shards, by an index built in one pass over them: each sample's
    key, captions, metadata and where its image is (an [`ImageRef`]: tar headers are read, image data passed over;
    a parquet shard's image column is not read). The index holds no images; an image is read when asked for, and
    decoded by MAGMA's one decoder ([`decode_image`]).

    `keys` are the samples' keys, `<shard name>/<sample key>` (unique: a key met twice is an error naming both
    places); `labels` name each sample's shard by its path, and its key: `<shard path>/<sample key>`.
    """

    PARQUET_GROUPS_KEPT = 4  # row groups of images kept in memory: captioning reads in order, few-shot draws jump

    def __init__(self, source: ShardSource):
        if not isinstance(source, (TarShards, ParquetShards)):
            raise TypeError(f"ShardIndex reads tar or parquet shards, not {type(source).__name__}")
        self.source = source
        self.samples: list[RawSample] = []
        self.shard_of: list[int] = []  # each sample's shard (a tar sample without image has no ImageRef to say it)
        for shard in tqdm(
            range(len(source)), desc=f"Indexing {source.name}", unit="shard", disable=not is_main_local_process()
        ):
            for sample in source.read(shard, images=False):
                self.samples.append(sample)
                self.shard_of.append(shard)
        self.keys = [sample.key for sample in self.samples]
        self.labels = [
            f"{source.shards[shard]}/{sample.key.partition('/')[2]}"
            for shard, sample in zip(self.shard_of, self.samples)
        ]
        first: dict[str, int] = {}
        for index, key in enumerate(self.keys):
            if first.setdefault(key, index) != index:
                raise ShardError(
                    f"{source.name}: the sample key {key} occurs twice ({self.labels[first[key]]} and "
                    f"{self.labels[index]}): keys must be unique to address a sample. Shards of the same name in "
                    "different folders cannot be read together: caption or evaluate each folder on its own"
                )
        self._groups: OrderedDict[tuple[int, int], list] = OrderedDict()

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int) -> bytes | str | None:
        """The image of sample `index` as its shard holds it (bytes, or a path for a parquet row of paths); `None`
        where the shard has none."""
        ref = self.samples[index].image
        if not isinstance(ref, ImageRef):
            return ref
        if not isinstance(self.source, ParquetShards):
            return self.source.read_image(ref)
        group = (ref.shard, ref.offset)  # a parquet image is read with its row group: keep the last few groups
        if group not in self._groups:
            self._groups[group] = self.source.read_group_images(*group)
            if len(self._groups) > self.PARQUET_GROUPS_KEPT:
                self._groups.popitem(last=False)
        self._groups.move_to_end(group)
        return self._groups[group][ref.size]

    def open_image(self, index: int) -> PIL.Image.Image:
        """Sample `index`'s image decoded by MAGMA's one decoder; a `ValueError` saying why where it cannot be."""
        value = self.image(index)
        if value is None:
            raise ValueError("the sample has no image")
        image, problem = decode_image({"bytes": value, "path": None} if isinstance(value, bytes) else {"path": value})
        if image is None:
            raise ValueError(problem)
        return image
