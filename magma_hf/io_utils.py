"""Writing files so that nothing the user has is lost: a file appears complete under its name, or not at all."""

from __future__ import annotations

import glob
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


def sync_path(path: str | os.PathLike) -> None:
    """fsync a file or folder (a folder's entry list makes a rename durable); file systems that refuse it are fine."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def sync_folder(folder: str | os.PathLike) -> None:
    """fsync every file under `folder`, then the folder: its contents are on disk before it is renamed into place."""
    for path in Path(folder).rglob("*"):
        if path.is_file():
            sync_path(path)
    sync_path(folder)


def move_files_into(files: Iterable[Path], folder: Path) -> None:
    """Move each staged file into `folder` under its name, in the order given: each lands complete (fsync, then a rename
    on the same file system); files of `folder` not among them are untouched."""
    for path in files:
        sync_path(path)
        os.replace(path, folder / path.name)
    sync_path(folder)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` when the block completes, removed if it fails.

    A kill midway leaves `path` as it was (absent or the previous complete file) and a hidden `.NAME.*.tmp` beside it.
    """
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    temporary = Path(temporary)
    try:
        yield temporary
        sync_path(temporary)
        os.replace(temporary, path)
        sync_path(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def leftover_temporaries(path: str | os.PathLike) -> list[Path]:
    """The temporary files that killed `atomic_path(path)` writes left beside `path` (its exact naming, no others)."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    return sorted(p for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp") if pattern.fullmatch(p.name))


def remove_leftover_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete what killed `atomic_path(path)` writes left beside `path` (their exact naming: no other file)."""
    leftovers = leftover_temporaries(path)
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    return leftovers


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def utf8_file_name(name: str) -> str:
    """A file name to write a copy under: `name`, its bytes that are not UTF-8 (Linux allows any in a name) written
    `%XX`, as JSON, Arrow columns and the Hub hold UTF-8 only."""
    parts, rest = [], os.fsencode(name)
    while rest:
        try:
            parts.append(rest.decode("utf-8"))
            break
        except UnicodeDecodeError as error:
            parts.append(rest[: error.start].decode("utf-8"))
            parts.append("".join(f"%{byte:02X}" for byte in rest[error.start : error.end]))
            rest = rest[error.end :]
    return "".join(parts)
