"""`convert_dataset`: any image-caption iterator into the original MAGMA layout (`images/`, `image_data/`), as the
original's `convert_datasets.py` did, never leaving a half-written dataset or half-moved images behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
from tqdm.auto import tqdm
from transformers.utils import logging

from ..folders import atomic_path, remove_leftover_temporaries, sync_path, utf8_file_name, write_text_atomically
from .decoding import SkipReport, caption_problem, clean_captions, decode_image, shown_path

logger = logging.get_logger(__name__)

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


def _unique_name(name: str, taken: set[str], sample_number: int) -> str:
    """`name`, or `stem-<k>` (then `stem-<k>-<i>`) when a file of that name, in any letter case, is in the folder."""
    path = Path(name)
    candidate, attempt = name, 0
    while candidate.casefold() in taken:
        attempt += 1
        suffix = f"-{sample_number}" if attempt == 1 else f"-{sample_number}-{attempt}"
        candidate = f"{path.stem}{suffix}{path.suffix}"
    return candidate


def has_length(iterable: Iterable) -> bool:
    """`len()` works: not merely defined (a DataLoader over an IterableDataset defines `__len__` and raises)."""
    try:
        len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return False
    return True


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
    total = len(ds_iterator) if has_length(ds_iterator) else None  # type: ignore[arg-type]
    for source_index, item in enumerate(tqdm(ds_iterator, total=total, desc="Converting to the MAGMA layout")):
        image_path, data = item
        image_path = Path(image_path)
        what = f"sample {source_index} ({shown_path(image_path)})"
        sample = dict(data)
        problem = caption_problem(sample.get("captions"))
        if problem:
            raise ValueError(f"{what}: {problem}")
        if clean_captions(sample.get("captions")) is None:
            report.skip(what, "no captions")
            continue
        key = str(image_path.resolve())  # two spellings of one file are one image (moving it twice would fail)
        if key not in new_locations:
            if not image_path.is_file():
                report.skip(f"sample {source_index}", f"missing image: {shown_path(image_path)} does not exist")
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
            name = _unique_name(utf8_file_name(image_path.name), names_in_folder, n_samples)
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
    with atomic_path(target) as temporary:  # a unique temporary name beside `target`, never one of the dataset's
        shutil.copy2(source, temporary)
    if mode == "mv":
        source.unlink()


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
    sync_path(data_dir)  # the renames are durable before the transfer list, which could finish them, goes
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
    for folder in (data_dir / "images", data_dir / "image_data"):
        if folder.is_dir() and any(folder.iterdir()):
            raise FileExistsError(
                f"{folder} is not empty: convert_dataset writes a new dataset and never overwrites one. "
                "Choose an empty data_dir."
            )
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


__all__ = ["ConversionSummary", "convert_dataset"]
