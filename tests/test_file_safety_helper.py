"""The shared guard of the user's files catches every way of losing them."""

import pytest

from tests.helpers import files_unchanged


@pytest.fixture
def user_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "README.md").write_text("mine")
    (tmp_path / "sub" / "photo.jpg").write_bytes(b"\xff\xd8 pixels")
    return tmp_path


def test_untouched_files_pass(user_folder):
    with files_unchanged(user_folder):
        (user_folder / "new.txt").write_text("a new file is allowed")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: (root / "README.md").unlink(), "deleted"),
        (lambda root: (root / "sub" / "photo.jpg").write_bytes(b"other pixels"), "changed"),
        (lambda root: (root / "README.md").write_text("mine"[::-1]), "changed"),
    ],
)
def test_damage_is_caught(user_folder, damage, message):
    with pytest.raises(AssertionError, match=message), files_unchanged(user_folder):
        damage(user_folder)


def test_allowed_changes_and_new_files(user_folder):
    with files_unchanged(user_folder, may_change=["README.md"]):
        (user_folder / "README.md").write_text("replaced on purpose")
    with pytest.raises(AssertionError, match="should write nothing"), files_unchanged(user_folder, no_new_files=True):
        (user_folder / "output.json").write_text("{}")


def test_checked_when_the_command_raises(user_folder):
    with pytest.raises(AssertionError, match="deleted"), files_unchanged(user_folder):
        with pytest.raises(RuntimeError):
            (user_folder / "README.md").unlink()
            raise RuntimeError("the command failed halfway")
