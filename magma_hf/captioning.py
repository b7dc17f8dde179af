"""`magma-hf caption`: captions (or answers to one prompt) for many images, into a resumable JSONL file.

The images come from a folder of image files, an image-caption dataset in any layout the training readers know
(`magma_hf.data.load_image_caption_dataset`: the original MAGMA layout, imagefolder, img2dataset; their
captions are not used), webdataset `.tar` or parquet shards (img2dataset's `webdataset` and `parquet` output: a
folder, glob or brace range; read where they lie through `magma_hf.data.shards.ShardIndex`, ids `<shard>/<key>`), or
a 🤗 dataset with an image column (a `save_to_disk` folder, or a `datasets.Dataset`).

The prompt is evaluation's captioning prompt (`evaluation.prompts.build_prompt`): the image, then `--prompt` if given
(e.g. "A picture of" or "Q: What is in the picture? A:"). Texts are generated greedily and cleaned up by the one
generation path, `magma_hf.generation.generate_answers` (batched with left padding, cut at the first newline), or
through vLLM with `--engine vllm` (`magma_hf.vllm.offline.VllmGenerator`, the same greedy answers).

The output is a record log as evaluation writes it, by the resumable job of both (`magma_hf.jobs`): a header line
`{"format": "magma_hf.caption/1", "settings": {...}}` naming what produced the texts, then one line per image,
`{"id", "image", "prompt", "text"}`, in the data's order once the run is complete. A rerun skips the images done; a
rerun with another model, prompt, data or settings is refused, naming the difference. A folder of images may change
between runs as long as every image done is still there (a bad image removed, new ones added: those are captioned);
a dataset's rows are numbered, so there the rows must stay the same. Under `accelerate launch` the
images are sharded over the processes exactly as evaluation's questions are. This module gives the job only the
captioning's identity (`RUN_KEYS`, `data_keys`, the engine's model) and its records (one per image).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import PIL.Image
from transformers.utils import logging

from .data import IMAGE_EXTENSIONS, SkipReport, decode_image, detect_layout, load_image_caption_dataset
from .data.decoding import name_problem, shown_path
from .data.shards import ShardIndex, open_shards
from .data.sources import reads_as_shards
from .evaluation.data import pick_split
from .evaluation.prompts import DEFAULT_MAX_NEW_TOKENS, build_prompt
from .generation import generate_answers
from .image_processing_magma import open_image
from .jobs import Job, Processes, add_model_arguments, load_model, processes, run_command

logger = logging.get_logger(__name__)

CAPTION_FORMAT = "magma_hf.caption/1"
ENGINES = ("transformers", "vllm")
# What produced a caption log's texts: a log written with other values is not resumed. The model's keys
# (`jobs.MODEL_KEYS`) are known only once it is loaded, so they are checked after these.
RUN_KEYS = ("prompt", "max_new_tokens", "engine")
DATA_KEYS = ("data", "split", "image_column", "data_images")


def data_keys(images: ImageSource) -> tuple[str, ...]:
    """The data settings a resumed log must share: the images' fingerprint only where ids are row numbers. Where
    they are file paths, the data may gain images or lose ones not yet done (the bad image the error says to
    remove): the texts done are still those of the same files, and an id done that is gone is refused."""
    return DATA_KEYS if images.ids_are_rows else tuple(key for key in DATA_KEYS if key != "data_images")


# ---------------------------------------------------------------------------------------------------------------------
# Images


@dataclass
class ImageSource:
    """The images to caption: `ids` (unique), `labels` (the output's `image`: a path, or `DATA[row]`), and a reader.

    `ids_are_rows`: the ids are row numbers, so that removing an image renumbers the ones after it and a log is
    resumed only on the same rows (`data_images`); ids that are file paths let the data lose images not yet done."""

    source: str
    ids: list[str]
    labels: list[str]
    read: Callable[[int], PIL.Image.Image]
    ids_are_rows: bool = True

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, index: int) -> PIL.Image.Image:
        try:
            return self.read(index)
        except Exception as error:  # PIL raises many types for a bad file
            # Advice that works: a file id survives the removal of another image, a row number does not.
            repair = (
                "Replace it with a readable image in its place (the ids are row numbers, which removing it would shift)"
                if self.ids_are_rows
                else "Fix or remove it"
            )
            raise ValueError(
                f"Cannot read the image {self.labels[index]} (id {self.ids[index]!r}): {type(error).__name__}: "
                f"{error}. {repair}, then run the same command again: the images done are kept."
            ) from None

    def fingerprint(self) -> str:
        """sha256 of the ids and image names (the images' bytes are not read: the data's path stands in for them)."""
        return "sha256:" + hashlib.sha256(json.dumps([self.ids, self.labels]).encode()).hexdigest()


def load_images(data, split: str | None = None, image_column: str = "image") -> ImageSource:
    """The images of `data`: a folder of image files (searched recursively, in sorted order; ids are the paths
    relative to the folder), a dataset folder in a layout the training readers know, `.tar` or parquet shards (a
    folder of them, a glob, a brace range; ids are the sample keys `<shard>/<key>`, in shard order), a `save_to_disk`
    folder, or a `datasets.Dataset` (ids are row numbers)."""
    if isinstance(data, (datasets.Dataset, datasets.DatasetDict)):
        return _from_hf_dataset(pick_split(data, split, "the given dataset"), image_column, "dataset")
    if reads_as_shards(data):
        return _from_shards(data, image_column)
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"--data {data}: there is no such folder")
    if not path.is_dir():
        raise ValueError(f"--data {data} is a file; give a folder of images or a dataset folder")
    try:
        layout = detect_layout(path)
    except ValueError:  # none of the dataset layouts: a folder of image files
        return _from_image_folder(path.resolve(), "a folder of {count} image files")
    if layout == "img2dataset":  # its captions are not used: every image is captioned, with or without one
        return _from_image_folder(path.resolve(), "img2dataset `files` output: captioning all its {count} images")
    if layout == "hf_saved":
        return _from_hf_dataset(pick_split(datasets.load_from_disk(str(path)), split, str(path)), image_column, path)
    return _from_reader(load_image_caption_dataset(str(path)), str(path.resolve()))


def _from_image_folder(folder: Path, read_as: str) -> ImageSource:
    """The image files under `folder` (ids: their paths relative to it); `read_as` states it in the log."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(
            f"{shown_path(folder)} holds no images ({', '.join(IMAGE_EXTENSIONS)}, searched recursively) and is not a "
            "dataset folder (the MAGMA layout, imagefolder, img2dataset or save_to_disk)"
        )
    bad_names = [shown_path(p) for p in files if name_problem(p)]
    if bad_names:  # the output is JSON lines of UTF-8: refused before anything is written
        shown = ", ".join(bad_names[:5]) + (f" and {len(bad_names) - 5} more" if len(bad_names) > 5 else "")
        raise ValueError(
            f"{len(bad_names)} image file name(s) under {shown_path(folder)} are not valid UTF-8, which the output "
            f"cannot hold: {shown}. Rename them, then run the same command again."
        )
    logger.info("--data %s: %s", folder, read_as.format(count=len(files)))
    ids = [p.relative_to(folder).as_posix() for p in files]
    return ImageSource(str(folder), ids, [str(p) for p in files], lambda i: open_image(files[i]), ids_are_rows=False)


def _decoded(value) -> PIL.Image.Image:
    image, reason = decode_image(value)
    if image is None:
        raise ValueError(reason)
    return image


def _from_reader(dataset: datasets.Dataset, source: str) -> ImageSource:
    """A dataset of the training readers (columns image, image_path, captions, metadata): ids are row numbers."""
    raw = dataset.with_format(None)
    paths = list(raw.select_columns(["image_path"])["image_path"])
    labels = [p or f"{source}[{row}]" for row, p in enumerate(paths)]
    return ImageSource(source, [str(row) for row in range(len(raw))], labels, lambda i: _decoded(raw[i]["image"]))


def _from_shards(spec: str | os.PathLike, image_column: str) -> ImageSource:
    """Shards read where they lie: an index of their samples (no image read), each image read and decoded when its
    batch is captioned. Captions are not needed; a sample without an image is skipped, as the training readers skip
    it (one warning each, then the counts)."""
    spec = os.fspath(spec)
    source = spec if "://" in spec else os.path.abspath(spec)  # the same shards from any working directory
    # The default column name is a 🤗 dataset's; parquet shards name theirs by encode format (jpg), found by itself.
    column = None if image_column == "image" else image_column
    index = ShardIndex(open_shards(source, image_column=column, require_captions=False))
    report = SkipReport(source)
    rows = []
    for row, sample in enumerate(index.samples):
        if sample.image is None:
            report.skip(index.labels[row], sample.problem or "missing image")
        else:
            rows.append(row)
    report.summarize(len(rows))
    if not rows:
        raise ValueError(f"--data {spec}: none of its {len(index)} samples has an image (see the warnings above)")
    return ImageSource(
        source, [index.keys[r] for r in rows], [index.labels[r] for r in rows], lambda i: index.open_image(rows[i])
    )


def _from_hf_dataset(dataset: datasets.Dataset, image_column: str, source) -> ImageSource:
    if image_column not in dataset.column_names:
        raise ValueError(
            f"{source} has no image column {image_column!r} (columns: {dataset.column_names}); name it with "
            "--image-column"
        )
    if len(dataset) == 0:
        raise ValueError(f"{source} has no rows")
    dataset = dataset.with_format(None)
    if isinstance(dataset.features.get(image_column), datasets.Image):  # MAGMA's one decoder reads the bytes
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    column = dataset.select_columns([image_column])
    name = str(Path(source).resolve()) if isinstance(source, Path) else str(source)

    def read(index: int) -> PIL.Image.Image:
        value = column[index][image_column]
        return open_image(value) if isinstance(value, (str, bytes)) else _decoded(value)

    rows = range(len(dataset))
    return ImageSource(name, [str(row) for row in rows], [f"{name}[{row}]" for row in rows], read)


# ---------------------------------------------------------------------------------------------------------------------
# Engines


def weight_files_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 of a model folder's safetensors files (names and bytes): the vLLM engine's model identity."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} holds no *.safetensors weights")
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\n".encode())
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 24), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def vllm_generator(model_dir: str, max_new_tokens: int, **llm_kwargs):
    """`magma_hf.vllm.offline.VllmGenerator`, imported only now; a clear error where vLLM is not installed."""
    if importlib.util.find_spec("vllm") is None:
        raise ValueError(
            "--engine vllm needs vLLM, which is not installed in this environment. `make vllm` creates .venv-vllm "
            "with it and this package: run `.venv-vllm/bin/magma-hf caption ... --engine vllm` there"
        )
    from .vllm.offline import VllmGenerator

    return VllmGenerator(model_dir, max_new_tokens, **llm_kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Caption


def caption_images(
    model,
    data,
    output: str | os.PathLike,
    *,
    processor=None,
    prompt: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    split: str | None = None,
    image_column: str = "image",
    engine: str = "transformers",
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Caption every image of `data` (or answer `prompt` for it) into the JSONL log `output`; resumable, sharded.

    Args:
        model: a MAGMA model folder, or (with `processor`, engine `transformers`) a `MagmaForConditionalGeneration`.
        data: see `load_images`.
        output: the JSONL file (header line, then one record per image).
        prompt: text after the image (default none: a caption).
        batch_size: images per `generate` call (left padding; the texts do not depend on it).
        max_new_tokens: generation budget (default 30, as evaluation's captions).
        engine: `transformers` (`generate`) or `vllm`.
        device / dtype: where and in which dtype the transformers engine loads a model folder.

    Returns:
        The records `{"id", "image", "prompt", "text"}` in the data's order (on every process).
    """
    _check_arguments(model, engine, batch_size, max_new_tokens)
    procs = processes()
    if engine == "vllm" and procs.count > 1:
        raise ValueError(
            f"--engine vllm runs as one process (vLLM batches, and parallelises with its own options); it was "
            f"started as {procs.count} processes: run it without accelerate launch"
        )
    # The data and the output are checked before the model is loaded or anything is written.
    images = load_images(data, split, image_column)
    output = Path(output)
    settings = {
        "prompt": build_prompt("caption", "", [], prompt),
        "max_new_tokens": max_new_tokens or DEFAULT_MAX_NEW_TOKENS["caption"],
        "engine": engine,
        "data": images.source,
        "split": split,
        "image_column": image_column,
        "data_images": images.fingerprint(),
    }
    if output.is_dir():
        raise ValueError(f"--output {output} is a folder; give a file name, e.g. {output / 'captions.jsonl'}")
    job = Job(CAPTION_FORMAT, output, settings, RUN_KEYS + data_keys(images), procs, what="caption log")
    job.check_output()  # a caption log of the same run, on the settings known before the model is loaded

    generate, identity = _engine(model, processor, engine, settings["max_new_tokens"], device, dtype, procs)
    settings.update(identity, batch_size=batch_size)
    index = {key: n for n, key in enumerate(images.ids)}
    job.resume(known=index.get)
    todo = job.pending(images.ids)
    if job.recorded is not None and job.recorded.get("data_images") != settings["data_images"] and procs.is_main:
        logger.warning(
            "%s: the images of %s changed since this log was started (%d now); the %d done are all still there: "
            "captioning the %d others",
            output, images.source, len(images), len(job.done), len(todo),
        )  # fmt: skip

    def records_for(batch: list[int]) -> list[dict[str, Any]]:
        texts = generate([settings["prompt"]] * len(batch), [[images.image(row)] for row in batch])
        return [
            {"id": images.ids[row], "image": images.labels[row], "prompt": settings["prompt"], "text": text}
            for row, text in zip(batch, texts)
        ]

    job.run(todo, len(images), records_for, batch_size, noun="images", desc="captioning", unit="image",
            progress=progress)  # fmt: skip
    job.finish(images.ids)
    return procs.broadcast([job.done[key] for key in images.ids] if procs.is_main else None)


def _check_arguments(model, engine: str, batch_size: int, max_new_tokens: int | None) -> None:
    if engine not in ENGINES:
        raise ValueError(f"Unknown engine {engine!r}; engines are {', '.join(ENGINES)}")
    for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if engine == "vllm" and not isinstance(model, (str, os.PathLike)):
        raise ValueError("--engine vllm takes a model folder, not a loaded model")


def _engine(model, processor, engine, max_new_tokens, device, dtype, procs: Processes):
    """`(generate(prompts, images) -> texts, the settings that identify the model)`."""
    if engine == "vllm":
        llm_kwargs = {} if dtype in (None, "auto") else {"dtype": dtype}
        identity = {"model": str(model), "model_weights": weight_files_fingerprint(model), "dtype": dtype or "auto"}
        return vllm_generator(str(model), max_new_tokens, **llm_kwargs), identity
    model, processor, identity = load_model(model, processor, device, dtype, procs)
    if processor is None:
        raise ValueError("caption_images() needs the model's processor (or a model folder to load both from)")

    def generate(prompts: list[str], batch_images: list[list[PIL.Image.Image]]) -> list[str]:
        return generate_answers(model, processor, prompts, batch_images, max_new_tokens=max_new_tokens)

    return generate, identity


# ---------------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        required=True,
        help="a folder of images, a dataset folder (MAGMA layout, imagefolder, img2dataset), .tar or parquet shards "
        "(a folder, a quoted glob 'out/*.tar' or brace range 'out/{00000..00009}.tar') or a save_to_disk folder",
    )
    parser.add_argument("--model", required=True, help="a MAGMA model folder (model and processor)")
    parser.add_argument("--output", default="captions.jsonl", help="the JSONL file (default captions.jsonl)")
    parser.add_argument("--prompt", help="text after the image, e.g. 'Q: What is in the picture? A:' (default none)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per generate call (default 8)")
    parser.add_argument("--max-new-tokens", type=int, help="generation budget (default 30)")
    parser.add_argument("--split", help="split of a save_to_disk dataset with several")
    parser.add_argument("--image-column", default="image", help="image column of a 🤗 dataset (default image)")
    parser.add_argument("--engine", default="transformers", choices=ENGINES, help="default transformers")
    add_model_arguments(parser, dtype_note="; vLLM: the folder's")


def run(args: argparse.Namespace) -> int:
    def work() -> list[dict[str, Any]]:
        return caption_images(args.model, args.data, args.output, prompt=args.prompt, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, split=args.split, image_column=args.image_column,
                              engine=args.engine, device=args.device, dtype=args.dtype,
                              progress=not args.no_progress)  # fmt: skip

    return run_command(work, lambda records: print(f"{len(records)} texts: {args.output}"))


__all__ = ["ImageSource", "caption_images", "load_images"]
