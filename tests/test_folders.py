"""folders.FolderWriter, the one way of writing into a user's folder: ownership by the manifest, staging, install
under a journal, rollback, and what a killed run leaves."""

import json
import os

import pytest

from magma_hf import folders
from magma_hf.folders import FolderWriter
from tests.helpers import files_unchanged


class WriterError(ValueError):
    pass


WRITER = FolderWriter(
    manifest_name="written.json",
    written_by="tests.test_folders",
    note="what the test writer wrote",
    infix=".writing-",
    lock_name="writing.lock",
    error=WriterError,
    noun="test write",
    keeps=lambda path: path.name == "README.md",
)


def write(folder, files: dict[str, str], overwrite: bool = False):
    """One run of the writer: `files` staged, then installed into `folder`."""
    with WRITER.staged(folder, overwrite) as (staging, changes):
        for name, text in files.items():
            (staging / name).write_text(text)
    return changes[0]


def test_the_same_command_twice(tmp_path):
    out = tmp_path / "out"
    write(out, {"a.txt": "1", "b.txt": "1", "README.md": "card"})
    assert set(json.loads((out / "written.json").read_text())["files"]) == {"README.md", "a.txt", "b.txt"}
    (out / "notes.txt").write_text("mine")
    with files_unchanged(tmp_path, no_new_files=True), pytest.raises(WriterError, match="holds an earlier test write"):
        write(out, {"a.txt": "2"})
    with files_unchanged(out, may_change=["a.txt", "b.txt", "README.md", "written.json"]):
        changes = write(out, {"a.txt": "2", "README.md": "card 2"}, overwrite=True)
    assert changes.replaced == ["README.md", "a.txt", "written.json"] and changes.removed == ["b.txt"]
    assert changes.kept == ["notes.txt"]
    assert sorted(os.listdir(out)) == ["README.md", "a.txt", "notes.txt", "written.json"]
    assert (out / "README.md").read_text() == "card 2"  # an earlier run's card, unedited: ours
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]


def test_an_edited_file_is_the_users(tmp_path):
    out = tmp_path / "out"
    write(out, {"a.txt": "1", "README.md": "card"})
    (out / "README.md").write_text("card, edited")
    with files_unchanged(out / "README.md"):
        changes = write(out, {"a.txt": "2", "README.md": "card 2"}, overwrite=True)
    assert "README.md" in changes.kept and (out / "a.txt").read_text() == "2"
    (out / "a.txt").write_text("2, edited")  # named like a file the writer writes: never replaced, even so
    with files_unchanged(tmp_path, no_new_files=True), pytest.raises(WriterError) as error:
        write(out, {"a.txt": "3"}, overwrite=True)
    assert "a.txt" in str(error.value) and "not replaced, even with --overwrite" in str(error.value)


def test_a_kill_mid_install_is_rolled_back_by_the_next_run(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write(out, {"a.txt": "1", "b.txt": "1"})
    (out / "notes.txt").write_text("mine")
    replace, roll_back = os.replace, FolderWriter.roll_back

    def dies_on_b(source, target):  # a.txt moved in, the earlier b.txt moved aside
        if os.path.basename(target) == "b.txt":
            raise KeyboardInterrupt("killed")
        replace(source, target)

    def killed_too(self, workspace, folder):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(os, "replace", dies_on_b)
    monkeypatch.setattr(FolderWriter, "roll_back", killed_too)  # no rollback: as after a SIGKILL
    with pytest.raises(KeyboardInterrupt):
        write(out, {"a.txt": "2", "b.txt": "2"}, overwrite=True)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(FolderWriter, "roll_back", roll_back)
    (leftover,) = WRITER.leftover_workspaces(out)
    assert (leftover / folders.INSTALL_JOURNAL).is_file() and (out / "a.txt").read_text() == "2"
    (done,) = WRITER.recover(out)
    assert "rolled back" in done and leftover.name in done and not leftover.exists()
    assert [(out / name).read_text() for name in ("a.txt", "b.txt", "notes.txt")] == ["1", "1", "mine"]
    write(out, {"a.txt": "2", "b.txt": "2"}, overwrite=True)  # and the command runs again
    assert (out / "b.txt").read_text() == "2"


def test_a_failure_mid_install_rolls_back_at_once(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write(out, {"a.txt": "1", "b.txt": "1"})
    replace = os.replace

    def full_on_b(source, target):
        if os.path.basename(target) == "b.txt":
            raise OSError(28, "No space left on device")
        replace(source, target)

    monkeypatch.setattr(os, "replace", full_on_b)
    with files_unchanged(out), pytest.raises(WriterError, match="No space left on device; nothing was moved"):
        write(out, {"a.txt": "2", "b.txt": "2"}, overwrite=True)
    assert not WRITER.leftover_workspaces(out)


def test_leftovers_are_removed_or_named(tmp_path):
    out = tmp_path / "out"
    killed = tmp_path / ".out.writing-abcd1234"  # killed before installing: removed
    (killed / "out").mkdir(parents=True)
    os.close(WRITER.take_lock(killed))
    (tmp_path / ".out.writing-efgh5678").mkdir()  # killed as it was made: empty, removed
    done = WRITER.recover(out)
    assert len(done) == 2 and not WRITER.leftover_workspaces(out)

    running = tmp_path / ".out.writing-ijkl9012"
    running.mkdir()
    descriptor = WRITER.take_lock(running)
    try:
        with pytest.raises(WriterError, match="another test write into .* is running"):
            WRITER.recover(out)
    finally:
        os.close(descriptor)
    (running / "writing.lock").unlink()
    (running / "theirs.txt").write_text("not a workspace's")
    with files_unchanged(running), pytest.raises(WriterError, match=r"ijkl9012 is named like .* not look like one"):
        WRITER.recover(out)
    other = tmp_path / ".out.writing-x.writing-abcd1234"  # another folder's (`out.writing-x`): never ours
    other.mkdir()
    assert WRITER.leftover_workspaces(out) == [running]


def test_manifest_records(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "config.json").write_text("{}")
    assert set(folders.file_record(tmp_path / "model.safetensors")) == {"size", "mtime_ns"}
    record = folders.file_record(tmp_path / "config.json")
    assert record == {"size": 2, "sha256": folders.sha256_of(tmp_path / "config.json")}
    files = {"config.json": record, "../outside": record, "model.safetensors": {"size": 1, "mtime_ns": 0}}
    (tmp_path / "m.json").write_text(folders.manifest_text("me", "note", files))
    assert set(folders.owned_files(tmp_path, "m.json")) == {"config.json", "m.json"}  # changed and outside: not ours
    (tmp_path / "m.json").write_text('{"files": ["config.json"]}')  # not the format: nothing is ours
    assert folders.owned_files(tmp_path, "m.json") == {}
