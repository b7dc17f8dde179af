"""`magma-hf app --write-space`: a model folder made a Space repo, started with `python app.py` where magma_hf cannot
be imported, answering over HTTP and through the Gradio API; and what the writer does to files already there."""

import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from magma_hf.app import MANIFEST_NAME, SPACE_MARKER, write_space
from magma_hf.app_magma import DEFAULT_MAX_NEW_TOKENS
from tests.app.chromium import free_port
from tests.helpers import WITHOUT_MAGMA_HF, files_unchanged


def wait_until_serving(url: str, process: subprocess.Popen, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"python app.py exited with {process.returncode}:\n{process.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read().decode()
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"python app.py did not serve {url} within {timeout} s")


@pytest.fixture
def space(app_folder, tmp_path):
    folder = tmp_path / "space"
    shutil.copytree(app_folder / "magma", folder)
    return folder


@pytest.mark.slow
def test_space_folder_starts_with_python_app_py_without_magma_hf(space, app_folder, loaded, tmp_path):
    pytest.importorskip("gradio_client", reason="the app needs Gradio: pip install -e '.[app]'")
    from gradio_client import Client, handle_file

    written = write_space(space, [str(app_folder / "image-1.png")])
    assert {"app.py", "requirements.txt", "app_magma.py", "prompts_magma.py", "app_examples/00-image-1.png"} <= set(
        written
    )
    assert "transformers" in (space / "requirements.txt").read_text()
    port = free_port()
    # app.py run as a Space runs it, in a Python where `import magma_hf` fails
    launcher = tmp_path / "run_app.py"
    launcher.write_text(WITHOUT_MAGMA_HF + "import runpy\nrunpy.run_path('app.py', run_name='__main__')\n")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(
        HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), GRADIO_ANALYTICS_ENABLED="False",
        GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
    )  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, str(launcher)], cwd=space, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        assert "MAGMA" in wait_until_serving(url, process)
        image = app_folder / "image-1.png"
        answer, prompt, message = Client(url, verbose=False).predict(
            [{"image": handle_file(str(image)), "caption": None}], "Q: What is it? A:", [], "",
            False, 1.0, 1.0, 0, DEFAULT_MAX_NEW_TOKENS, api_name="/on_run",
        )  # fmt: skip
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert message.startswith("Done after"), message
    assert prompt == "<|image|>Q: What is it? A:"
    _, _, pipe = loaded
    greedy = {"do_sample": False, "max_new_tokens": DEFAULT_MAX_NEW_TOKENS}
    assert answer == pipe(images=[str(image)], text="Q: What is it? A:", generate_kwargs=greedy)[0]["generated_text"]
    assert not (tmp_path / "modules" / "magma_hf").exists()


def test_write_space_twice_writes_nothing_the_second_time(space):
    assert write_space(space)
    with files_unchanged(space, no_new_files=True):
        assert write_space(space) == []


def test_write_space_never_replaces_a_file_it_did_not_write(space):
    (space / "app.py").write_text("print('my own app')\n")
    with files_unchanged(space, no_new_files=True), pytest.raises(FileExistsError, match=r"already has app\.py"):
        write_space(space)


def test_write_space_replaces_its_own_earlier_files(space, monkeypatch):
    import magma_hf.app

    with monkeypatch.context() as older:  # what an earlier version of magma_hf wrote
        older.setattr(magma_hf.app, "space_requirements", lambda: f"{SPACE_MARKER}: an older version\ntorch\n")
        write_space(space)
    assert write_space(space) == ["requirements.txt"]
    assert "transformers" in (space / "requirements.txt").read_text()


def test_write_space_keeps_a_generated_file_the_user_edited(space, caplog):
    """Still starting with the marker line, an edited app.py is the user's: kept and named, the rest written."""
    write_space(space)
    edited = (space / "app.py").read_text().replace("__main__", "__main__" + " and True")
    (space / "app.py").write_text(edited)  # today: replaced by the next --write-space
    (space / "app_magma.py").unlink()
    with files_unchanged(space / "app.py"), caplog.at_level(logging.WARNING, logger="magma_hf.app"):
        assert write_space(space) == ["app_magma.py"]
    assert any("kept app.py" in record.getMessage() for record in caplog.records)
    # one written by a magma_hf that recorded nothing (the marker only) and not what it writes now: kept as well
    (space / MANIFEST_NAME).unlink()
    (space / "requirements.txt").write_text(f"{SPACE_MARKER}: edited or older\ntorch\n")
    with files_unchanged(space):
        assert write_space(space) == []


def test_write_space_names_missing_tokenizer_files(space):
    (space / "tokenizer.json").unlink()  # today: a Space that fails when it starts
    with files_unchanged(space, no_new_files=True), pytest.raises(OSError, match=r"space has no tokenizer\.json"):
        write_space(space)


def test_write_space_keeps_the_folders_model_code(space):
    (space / "processing_magma.py").write_text((space / "processing_magma.py").read_text() + "# the saved version\n")
    with files_unchanged(space / "processing_magma.py"):
        write_space(space)


def test_write_space_needs_a_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        write_space(tmp_path)


def test_the_command_writes_the_space_and_says_how_to_start_it(space, capsys):
    from magma_hf.cli import main

    assert main(["app", str(space), "--write-space"]) == 0
    out = capsys.readouterr().out
    assert "wrote app.py" in out and f"cd {space} && python app.py" in out and "sdk: gradio" in out
    assert main(["app", str(space), "--write-space"]) == 0
    assert "already a Space" in capsys.readouterr().out


def test_the_command_names_a_missing_example_before_loading(space):
    from magma_hf.cli import main

    with pytest.raises(FileNotFoundError, match="Example image 'no-such.png' does not exist"):
        main(["app", str(space), "--examples", "no-such.png"])


def test_write_space_after_a_kill_midway_finishes_and_cleans_up(space):
    from magma_hf.app import space_files

    files = space_files(space, [])
    (space / "app.py").write_bytes(files["app.py"])  # written before the kill
    leftover = space / ".requirements.txt.abcd1234.tmp"  # atomic_path's temporary, half written
    leftover.write_text("torch\ntransfor")
    with files_unchanged(space / "app.py"):
        written = write_space(space)
    assert "app.py" not in written and "requirements.txt" in written
    assert not leftover.exists()
    assert (space / "requirements.txt").read_bytes() == files["requirements.txt"]


def test_write_space_gives_an_example_named_in_another_encoding_a_utf8_name(space, app_folder, tmp_path):
    latin1 = os.fsdecode(bytes(tmp_path) + b"/caf\xe9.png")  # Linux allows it; a Space repo's names are UTF-8
    shutil.copy(app_folder / "image-1.png", latin1)
    assert "app_examples/00-caf%E9.png" in write_space(space, [latin1])
    assert (space / "app_examples" / "00-caf%E9.png").read_bytes() == (app_folder / "image-1.png").read_bytes()


def test_write_space_records_its_files_in_the_one_manifest_format(space):
    """`.magma_space.json` is a `folders.py` manifest (size and sha256 by name); one an earlier version wrote (the
    sha256 alone) still names that version's files as ours."""
    import hashlib
    import json

    write_space(space)
    manifest = json.loads((space / MANIFEST_NAME).read_text())
    assert manifest["written_by"] == "magma-hf app --write-space"
    assert set(manifest["files"]["app.py"]) == {"size", "sha256"}
    older = f"{SPACE_MARKER}: an older version\ntorch\n".encode()
    (space / "requirements.txt").write_bytes(older)
    files = {name: record["sha256"] for name, record in manifest["files"].items()}
    files["requirements.txt"] = hashlib.sha256(older).hexdigest()
    (space / MANIFEST_NAME).write_text(json.dumps({"written_by": "magma-hf app --write-space", "files": files}))
    assert write_space(space) == ["requirements.txt"]
    assert "transformers" in (space / "requirements.txt").read_text()
