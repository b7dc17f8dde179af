"""Writing into a user's folder so that nothing the user has is lost: one way, for every command that writes one.

The pieces: a file appears complete under its name or not at all (`atomic_path`, `write_text_atomically`, the fsyncs);
and the transaction of a whole set of files (`FolderWriter`), which every writer of a folder uses:

- **One ownership rule.** A file is ours when the folder's manifest (a writer's JSON file: `written_by`, `note`,
  `files: {name: record}`) lists it with this record: its size and sha256, or for the weight files (verified, or too
  large to hash at every save) its size and modification time. Everything else in the folder is the user's: never
  replaced or deleted. A user's file named like one we write is either kept (the writer's `keeps`: a model card, an
  edited generated file) or named in an error before anything is written.
- **Built beside, moved into place.** The files are written into a hidden workspace on the folder's file system
  (locked while the writer runs), recorded in the manifest, synced, and moved in: a new folder is the staged one
  renamed; into an existing one, the earlier files we replace are moved aside and the new ones moved in, under a
  journal. A failure rolls back from the journal; after a kill, the next run of the writer rolls it back or removes
  the leftover workspace, and names any it cannot tell (`FolderWriter.recover`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from transformers.utils import logging

from .weights_magma import is_weights_name

logger = logging.get_logger(__name__)

# ---------------------------------------------------------------------------------------------------------------------
# Files: complete under their name or absent


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


# ---------------------------------------------------------------------------------------------------------------------
# The manifest: which files of a folder are ours (a saved model's weight files, `is_weights_name`, are recorded by size
# and modification time: the converter verifies them against the checkpoint, and hashing 12 GB at every save would
# double the writing's reading)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """How the manifest recognises a file later: its size, and its sha256, or (the weights) its modification time."""
    stat = path.stat()
    if is_weights_name(path.name):
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return {"size": stat.st_size, "sha256": sha256_of(path)}


def matches_record(path: Path, record: Any) -> bool:
    """Whether the file at `path` is the one the manifest recorded (unchanged since it was written)."""
    if isinstance(record, str):  # `--write-space` manifests before the one format: the sha256 alone
        return sha256_of(path) == record
    if not isinstance(record, dict):
        return False
    stat = path.stat()
    if stat.st_size != record.get("size"):
        return False
    if "sha256" in record:
        return sha256_of(path) == record["sha256"]
    return stat.st_mtime_ns == record.get("mtime_ns")


def is_plain_name(name: str) -> bool:
    """A relative path inside the folder (no `..`, not absolute): what a manifest may name."""
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and str(path) == name


def read_manifest(folder: Path, manifest_name: str) -> dict[str, Any] | None:
    """The records of `folder`'s manifest, by name (a relative path); `None` without a readable one."""
    try:
        files = json.loads((folder / manifest_name).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):  # no manifest (or a damaged one): nothing is known to be ours
        return None
    return dict(files) if isinstance(files, dict) else None


def owned_files(folder: Path, manifest_name: str) -> dict[str, Any]:
    """The files of `folder` that are ours: listed in its manifest and unchanged since (and the manifest itself, when
    it could be read), by name: their records."""
    records = read_manifest(folder, manifest_name)
    if records is None:
        return {}
    unchanged = {
        name: record
        for name, record in records.items()
        if is_plain_name(name)  # then no symlink on the way (a folder of the name, or the file), and as recorded
        and not any((folder / part).is_symlink() for part in PurePosixPath(name).parents if str(part) != ".")
        and not (folder / name).is_symlink() and (folder / name).is_file() and matches_record(folder / name, record)
    }
    return unchanged | {manifest_name: {}}  # it was read: it is ours


def manifest_text(written_by: str, note: str, files: dict[str, Any], **extra: Any) -> str:
    """The one manifest format: who wrote the folder's files, what that means, and their records by name."""
    return json.dumps({"written_by": written_by, "note": note, **extra, "files": files}, indent=2) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# Locks: a running writer is never taken for a killed one's leftover (`FolderWriter.take_lock` holds one)


def lock_is_free(lock: Path) -> bool:
    """Nobody holds the lock: the writer that took it has ended (a SIGKILL too releases it)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: a leftover cannot be told from a running writer
        return False
    descriptor = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(descriptor)


# ---------------------------------------------------------------------------------------------------------------------
# The transaction


INSTALL_JOURNAL = "install.json"  # written before files are moved into an existing folder, for a rollback
PREVIOUS = "previous"  # in the workspace: the earlier files moved aside while the new ones are moved in


@dataclass
class FolderChanges:
    """What installing does to the entries already in the folder (names in the folder)."""

    replaced: list[str] = field(default_factory=list)  # ours (unchanged), written again: replaced
    removed: list[str] = field(default_factory=list)  # ours, not written this time: removed
    kept: list[str] = field(default_factory=list)  # the user's: left as they are
    conflicts: list[str] = field(default_factory=list)  # the user's, named like a file we write, not to be kept

    @property
    def earlier(self) -> list[str]:
        """The files an earlier run of the writer left: what installing replaces or removes."""
        return self.replaced + self.removed


@dataclass(frozen=True)
class FolderWriter:
    """One writer of a folder: its manifest, its workspace, its lock, and how its messages read.

    The workspace is `.{folder name}{infix}XXXXXXXX` beside the folder (a random suffix: mkdtemp's), or with
    `fixed_workspace` `.{folder name}{infix}` beside it, or (`inside`) `{folder}/{infix}` in it, for writers whose
    processes must all find it (a distributed save) or whose folder also holds other things. The files are staged in
    `workspace/{folder name}` (the folder's own name: a model card shows it).

    Messages name the folder as `{label} {folder}` (`--output out`) and the writer as `noun` (`conversion`).
    """

    manifest_name: str
    written_by: str
    note: str
    infix: str
    lock_name: str
    error: type[Exception] = ValueError
    noun: str = "conversion"
    label: str = "--output"
    overwrite_flag: str = "--overwrite"  # named where an earlier run's files need it; "" where it is always given
    keeps: Callable[[Path], bool] = lambda path: False  # a user's file named like one we write, kept (ours not written)
    fixed_workspace: bool = False
    inside: bool = False

    @property
    def a_noun(self) -> str:
        return f"{'an' if self.noun[:1] in 'aeiou' else 'a'} {self.noun}"

    # ---- what the folder holds ----

    def parent(self, folder: Path) -> Path:
        """Where the workspace is made: next to `folder` on its file system (where a symlinked `folder` points)."""
        if self.inside:
            return folder
        return (folder.resolve() if folder.is_dir() else folder.absolute()).parent

    def changes(self, folder: Path, writes: Callable[[str], bool]) -> FolderChanges:
        """Sort what `folder` holds: ours, the user's, and the user's that we would have to replace (`writes(name)`:
        this run writes `name`)."""
        changes = FolderChanges()
        if not folder.is_dir():
            return changes
        ours = owned_files(folder, self.manifest_name)
        for path in sorted(folder.iterdir()):
            name = path.name
            if self.inside and name == self.infix:
                continue  # the workspace itself
            if name in ours:
                (changes.replaced if writes(name) else changes.removed).append(name)
            elif writes(name) and not self.keeps(path):
                changes.conflicts.append(name)
            else:  # the user's, and (named like ours, kept) ours not installed
                changes.kept.append(name)
        return changes

    def check(self, folder: Path, overwrite: bool, writes: Callable[[str], bool]) -> FolderChanges:
        """What installing into `folder` would change; raises when that would replace a file that is not ours, or an
        earlier run's without `overwrite`."""
        if folder.is_file() or (folder.is_symlink() and not folder.is_dir()):
            raise self.error(f"{self.label} {folder} is a file; give a folder")
        changes = self.changes(folder, writes)
        if changes.conflicts:
            even = f", even with {self.overwrite_flag}" if self.overwrite_flag else ""
            raise self.error(
                f"{self.label} {folder} holds {len(changes.conflicts)} files that {self.a_noun} writes but that no "
                f"{self.noun} wrote there (or that changed since it did, per {self.manifest_name}): "
                f"{', '.join(changes.conflicts)}. Nothing was written; they are not replaced{even}: move them away or "
                "choose another folder."
            )
        if changes.earlier and not overwrite:
            kept = f"; the other {len(changes.kept)} entries there are kept either way" if changes.kept else ""
            raise self.error(
                f"{self.label} {folder} holds an earlier {self.noun} ({len(changes.earlier)} files, listed in "
                f"{self.manifest_name}); nothing was written. Pass --overwrite (overwrite=True) to replace those "
                f"files once the new {self.noun} is complete{kept}, or choose another folder."
            )
        return changes

    def check_parent(self, folder: Path) -> None:
        """The folder that is to hold `folder` exists and is writable: the files are built next to `folder`."""
        parent = self.parent(folder)
        if not parent.is_dir():
            what = "is a file" if parent.exists() else "does not exist"
            raise self.error(
                f"cannot write {self.label} {folder}: the folder {parent} that should hold it {what}; create it (or "
                "fix the path) first"
            )
        if not os.access(parent, os.W_OK | os.X_OK):
            raise self.error(f"cannot write {self.label} {folder}: the folder {parent} is not writable")

    # ---- workspaces, and what killed runs left ----

    def workspace_name(self, folder: Path) -> str:
        return self.infix if self.inside else f".{folder.name}{self.infix}"

    def leftover_workspaces(self, folder: Path) -> list[Path]:
        """The workspaces of this writer's runs into `folder`: exactly their naming (mkdtemp's
        `.{name}{infix}XXXXXXXX`), so that another folder's (`out.converting-x`, or `run1` for `run[1]`) is never
        taken for one."""
        prefix = self.workspace_name(folder)
        if self.inside or self.fixed_workspace:
            path = self.parent(folder) / prefix
            return [path] if path.is_dir() else []
        pattern = re.compile(rf"{re.escape(prefix)}[a-z0-9_]{{8}}")
        candidates = self.parent(folder).glob(f"{glob.escape(prefix)}*")
        return sorted(path for path in candidates if path.is_dir() and pattern.fullmatch(path.name))

    def recover(self, folder: Path) -> list[str]:
        """Clean up after runs into `folder` that were killed: a workspace holding only half-written files is removed;
        an installation into an existing `folder` that was cut short is rolled back (the earlier files moved back).
        Returns what was done, one line each; raises naming the workspace where it cannot tell."""
        done = []
        for workspace in self.leftover_workspaces(folder):
            lock = workspace / self.lock_name
            # the journal's atomic write, killed midway
            journal_writes = {path.name for path in leftover_temporaries(workspace / INSTALL_JOURNAL)}
            ours = {self.lock_name, folder.name, INSTALL_JOURNAL, PREVIOUS} | journal_writes
            entries = {path.name for path in workspace.iterdir()}
            if entries and (not lock.is_file() or not entries <= ours):  # empty: killed as it was made
                raise self.error(
                    f"{workspace} is named like the temporary folder of {self.a_noun} into {folder} but does not look "
                    f"like one (no {self.lock_name}, or other files in it): check what it holds, then move or delete it"
                )
            if entries and not lock_is_free(lock):
                raise self.error(
                    f"another {self.noun} into {folder} is running ({lock.read_text().strip() or 'pid unknown'}, "
                    f"temporary folder {workspace}); wait for it to finish, or stop it"
                )
            if (workspace / INSTALL_JOURNAL).is_file():
                restored = self.roll_back(workspace, folder)
                done.append(
                    f"rolled back the interrupted installation of {self.a_noun} into {folder} ({restored} files of the "
                    f"earlier {self.noun} moved back) and removed its temporary folder {workspace.name}"
                )
            else:  # killed before installing (or after a complete one: `previous` then holds replaced files)
                done.append(
                    f"removed {workspace.name}, the temporary folder of an interrupted {self.noun} into {folder}"
                )
            shutil.rmtree(workspace)
        for line in done:
            logger.warning(line)
        return done

    def take_lock(self, workspace: Path) -> int:
        """Create and hold (flock) `workspace/lock_name`; returns its descriptor, to close when the writer is done."""
        descriptor = os.open(workspace / self.lock_name, os.O_CREAT | os.O_WRONLY, 0o644)
        try:  # locked before anything else: another run's `lock_is_free` must never see this workspace unlocked
            import fcntl

            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass
        os.write(descriptor, f"pid {os.getpid()}\n".encode())
        return descriptor

    def roll_back(self, workspace: Path, folder: Path) -> int:
        """Undo a cut-short `install`: the new files already moved into `folder` go back to the staging folder, the
        earlier ones back into `folder`. Moves only, so that a rollback cut short in turn can be run again."""
        journal = json.loads((workspace / INSTALL_JOURNAL).read_text())
        staging, previous = workspace / journal["staging"], workspace / PREVIOUS
        for name in journal["installing"]:
            if not (staging / name).exists() and (folder / name).is_file():
                os.rename(folder / name, staging / name)  # moved in before the kill: this run's own file
        restored = 0
        for name in journal["moving_aside"]:
            if (previous / name).exists():
                if (folder / name).exists():
                    raise self.error(
                        f"cannot roll back the interrupted {self.noun} into {folder}: {folder / name} exists and so "
                        f"does the earlier {previous / name}; keep one of them, then delete {workspace}"
                    )
                os.rename(previous / name, folder / name)
                restored += 1
        sync_path(folder)
        return restored

    # ---- staging and installing ----

    @contextmanager
    def workspace(self, folder: Path) -> Iterator[Path]:
        """A new, locked workspace for a run into `folder`, holding the empty staging folder `workspace/{folder name}`
        (yielded). Removed when the block ends, unless it holds a cut-short installation (the next run rolls it
        back)."""
        parent = self.parent(folder)
        if self.inside or self.fixed_workspace:
            workspace = parent / self.workspace_name(folder)
            workspace.mkdir()
        else:
            workspace = Path(tempfile.mkdtemp(prefix=self.workspace_name(folder), dir=parent))
        lock = self.take_lock(workspace)
        try:
            staging = workspace / folder.name
            staging.mkdir()
            yield staging
        finally:
            if (workspace / INSTALL_JOURNAL).exists():  # a rollback that failed: the earlier files are in there
                logger.warning(
                    f"the cut-short installation into {folder} is kept in {workspace}; the next {self.noun} into "
                    f"{folder} rolls it back"
                )
            else:
                shutil.rmtree(workspace, ignore_errors=True)
            os.close(lock)

    @contextmanager
    def staged(self, folder: Path, overwrite: bool) -> Iterator[tuple[Path, list[FolderChanges]]]:
        """A staging folder for a run into `folder` (see `workspace`). Once the block completes, its files are
        installed (`install`); the `FolderChanges` it made are put into the list yielded with the folder. An
        `OSError` (disk full, permissions) becomes this writer's error naming the folder, not a temporary path."""
        with ExitStack() as stack:
            try:
                staging = stack.enter_context(self.workspace(folder))
            except OSError as error:
                parent = self.parent(folder)
                raise self.error(f"cannot write {self.label} {folder}: {parent}: {error.strerror}") from error
            try:
                result: list[FolderChanges] = []
                yield staging, result
                result.append(self.install(staging, folder, overwrite))
            except OSError as error:
                outcome = (
                    f"the cut-short installation is kept in {staging.parent} and the next {self.noun} into {folder} "
                    "rolls it back"
                    if (staging.parent / INSTALL_JOURNAL).exists()
                    else f"nothing was moved into {folder}"
                )
                raise self.error(
                    f"writing the {self.noun} for {self.label} {folder} failed: {error.strerror or error}; {outcome}"
                ) from error

    def install(
        self, staging: Path, folder: Path, overwrite: bool, first: Sequence[str] = (), **extra: Any
    ) -> FolderChanges:
        """Move the complete staged files into `folder`, recording them in the manifest (`first` listed first, the rest
        by name; `extra`: more manifest fields). A new `folder` is the staging folder renamed (atomic); into an existing
        one, the earlier run's files are moved aside, then the new ones moved in, under a journal that lets a rollback
        (now, or by the next run after a kill) undo a cut-short installation. The user's files stay as they are."""
        staged = {path.name for path in staging.iterdir()} | {self.manifest_name}
        changes = self.check(folder, overwrite, lambda name: name in staged)  # the exact names, and the folder now
        for name in changes.kept:
            if name in staged and name != self.manifest_name:
                (staging / name).unlink()  # the user's (a model card, an edited file): ours is not installed
        names = sorted(path.name for path in staging.iterdir() if path.name != self.manifest_name)
        names = [name for name in first if name in names] + [name for name in names if name not in first]
        files = {name: file_record(staging / name) for name in names}
        (staging / self.manifest_name).write_text(manifest_text(self.written_by, self.note, files, **extra))
        sync_folder(staging)
        if not folder.exists():
            os.rename(staging, folder)
            sync_path(self.parent(folder))
            return changes
        installing = [*sorted(files), self.manifest_name]
        workspace = staging.parent
        journal = {"staging": staging.name, "moving_aside": changes.earlier, "installing": installing}
        write_text_atomically(workspace / INSTALL_JOURNAL, json.dumps(journal, indent=2) + "\n")
        previous = workspace / PREVIOUS
        try:
            previous.mkdir()
            for name in changes.earlier:
                os.rename(folder / name, previous / name)
            # each lands complete (fsync, then a rename); the manifest last: until it is in place, the folder does
            # not claim the new files
            for name in installing:
                sync_path(staging / name)
                os.replace(staging / name, folder / name)
            sync_path(folder)
        except BaseException:
            self.roll_back(workspace, folder)  # if this fails too, the journal stays for the next run
            os.unlink(workspace / INSTALL_JOURNAL)
            raise
        os.unlink(workspace / INSTALL_JOURNAL)  # complete: nothing to roll back
        return changes


__all__ = [
    "FolderChanges", "FolderWriter", "atomic_path", "file_record", "leftover_temporaries", "lock_is_free",
    "manifest_text", "matches_record", "owned_files", "read_manifest", "remove_leftover_temporaries", "sha256_of",
    "sync_folder", "sync_path", "utf8_file_name", "write_text_atomically"
]
