"""`magma-hf app MODEL_DIR`: the Gradio app (`app_magma.py`) on a model folder, or (`--write-space`) the folder made a
Hugging Face Space repo that runs it with `python app.py`, loading the model from the same repo with
`trust_remote_code=True`.

The Space files are `app.py`, `requirements.txt`, the app's own code (`app_magma.py`, `prompts_magma.py`, and any
module they import that the folder lacks) and, with `--examples`, the example images in `app_examples/`. Each is
written atomically and only where it is absent, identical (nothing to do), or exactly as an earlier `--write-space`
wrote it (its record in the folder's `MANIFEST_NAME`, the one manifest format of `folders.py`). A generated file the
user changed since (it may still start with `SPACE_MARKER`) is the user's: kept, and named; any other file in the way
is named and nothing is written. A run killed midway leaves complete files (and temporaries, which the next run
removes): running it again finishes the job.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
from pathlib import Path

from transformers.dynamic_module_utils import get_relative_import_files
from transformers.utils import logging

from . import app_magma
from .folders import (
    atomic_path,
    file_record,
    manifest_text,
    owned_files,
    read_manifest,
    remove_leftover_temporaries,
    utf8_file_name,
    write_text_atomically,
)
from .hub_magma import check_processor_files

logger = logging.get_logger(__name__)

MANIFEST_NAME = ".magma_space.json"  # the record of each file --write-space wrote: what a later run may replace
SPACE_MARKER = "# Written by `magma-hf app --write-space`"
APP_PY = f'''{SPACE_MARKER}: this folder as a Hugging Face Space (the Gradio SDK runs `python app.py`).
# The app's code and the model's code come from this folder (trust_remote_code=True); magma_hf is not needed.
from pathlib import Path

from transformers.dynamic_module_utils import get_class_from_dynamic_module

if __name__ == "__main__":
    folder = str(Path(__file__).resolve().parent)
    get_class_from_dynamic_module("app_magma.main", folder)(folder)
'''


def space_requirements() -> str:
    """requirements.txt: the package's own dependencies, from its metadata (pyproject.toml), without the extras; a
    Space's Gradio comes with its SDK."""
    try:
        requires = importlib.metadata.requires("magma-hf") or []
    except importlib.metadata.PackageNotFoundError as error:
        raise RuntimeError(
            "requirements.txt lists magma-hf's dependencies, read from its installed metadata, and magma-hf is not "
            "installed here: pip install -e . (or pip install magma-hf), then run the command again"
        ) from error
    requirements = [requirement for requirement in requires if "extra ==" not in requirement]
    return f"{SPACE_MARKER}: what the folder's code imports.\n" + "\n".join(requirements) + "\n"


def space_files(model_dir: Path, examples: list[str]) -> dict[str, bytes]:
    """What `--write-space` writes, by path relative to `model_dir`."""
    files = {"app.py": APP_PY.encode(), "requirements.txt": space_requirements().encode()}
    # `app_magma.py` itself and the modules it imports, relative to the package (copied where the folder lacks them)
    for module in [Path(app_magma.__file__), *map(Path, get_relative_import_files(app_magma.__file__))]:
        is_app_code = module.name in ("app_magma.py", "prompts_magma.py")
        if is_app_code or not (model_dir / module.name).exists():  # the model's own code stays as it was saved
            source = module.read_text(encoding="utf-8")
            files[module.name] = f"{SPACE_MARKER} from magma_hf.\n{source}".encode()
    for number, example in enumerate(app_magma.example_images_in(examples)):  # numbered: names may repeat
        name = utf8_file_name(Path(example).name)  # a Space repo's names are UTF-8
        files[f"{app_magma.EXAMPLES_FOLDER}/{number:02d}-{name}"] = Path(example).read_bytes()
    return files


def written_by_us(path: Path) -> bool:
    """Whether a file starts with `SPACE_MARKER`: generated, though perhaps changed by the user since."""
    with open(path, "rb") as stream:
        return stream.read(len(SPACE_MARKER)) == SPACE_MARKER.encode()


def write_space(model_dir: str | os.PathLike, examples: list[str] = ()) -> list[str]:
    """Make `model_dir` a Space repo; returns the paths written (relative), empty when all were already there.

    The one ownership rule of `folders.py`: a file is replaced only where the manifest lists it unchanged (its size
    and sha256). A generated file the user changed since (recorded, or starting with `SPACE_MARKER`) is the user's:
    kept, and named in a warning. Raises `FileExistsError` naming every other file in the way (not written by
    `--write-space`, and not what it would write) before writing anything."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: give a saved MAGMA model folder")
    check_processor_files(model_dir)  # a Space without them would fail only when it starts
    files = space_files(model_dir, list(examples))
    recorded = read_manifest(model_dir, MANIFEST_NAME) or {}
    ours = owned_files(model_dir, MANIFEST_NAME)
    manifest = dict(recorded)
    in_the_way, edited, to_write = [], [], {}
    for name, content in files.items():
        path = model_dir / name
        current = path.read_bytes() if path.is_file() and not path.is_symlink() else None
        if current == content:
            manifest[name] = file_record(path)  # ours either way
        elif (not path.exists() and not path.is_symlink()) or name in ours:  # absent, or as an earlier run wrote it
            to_write[name] = content
        elif current is not None and (name in recorded or (name.endswith((".py", ".txt")) and written_by_us(path))):
            edited.append(name)  # generated, then changed by the user: the user's now
        else:
            in_the_way.append(name)
    if in_the_way:
        raise FileExistsError(
            f"{model_dir} already has {', '.join(in_the_way)}, not written by `magma-hf app --write-space` and not "
            "what it would write: move them away (nothing was written)"
        )
    for name in files:  # what a killed earlier run left (their exact naming only)
        remove_leftover_temporaries(model_dir / name)
    for name, content in to_write.items():
        path = model_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temporary:
            temporary.write_bytes(content)
        manifest[name] = file_record(path)
    if manifest != recorded or not (model_dir / MANIFEST_NAME).is_file():
        remove_leftover_temporaries(model_dir / MANIFEST_NAME)
        note = "What `magma-hf app --write-space` wrote here; it replaces a file only while it is unchanged."
        write_text_atomically(model_dir / MANIFEST_NAME, manifest_text("magma-hf app --write-space", note, manifest))
    if edited:
        logger.warning(
            "%s: kept %s, changed since `magma-hf app --write-space` wrote it (or written by an earlier version and "
            "not what it writes now): the file is yours. Delete it and run the command again to have it written.",
            model_dir, ", ".join(edited),
        )  # fmt: skip
    return sorted(to_write)


def space_metadata_present(readme: Path) -> bool:
    """Whether a README's YAML front matter names a Space SDK (the Hub runs a Space repo only with one)."""
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    front_matter = text.split("---", 2)[1] if text.startswith("---") and text.count("---") >= 2 else ""
    return any(line.startswith("sdk:") for line in front_matter.splitlines())


def demo_app_command(model_dir: str | os.PathLike, examples: str | os.PathLike | None = None) -> str:
    """The command that opens the app on `model_dir` (what `make demo` prints at the end)."""
    command = f"magma-hf app {model_dir}"
    return f"{command} --examples {examples}" if examples else command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="A saved MAGMA model folder (converted, trained, or demo-output/magma)")
    parser.add_argument("--host", default="127.0.0.1", help="Address to serve on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="Port (default: 7860)")
    parser.add_argument("--examples", nargs="+", default=[], help="Images or folders of images offered as examples")
    parser.add_argument("--max-images", type=int, default=app_magma.MAX_IMAGES, help="Images per request, at most")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--write-space", action="store_true",
        help="Write app.py, requirements.txt and the app's code into MODEL_DIR (a Hugging Face Space repo that "
        "starts with `python app.py`), then exit",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if args.write_space:
        written = write_space(args.model_dir, args.examples)
        print(f"{args.model_dir}: wrote {', '.join(written)}" if written else f"{args.model_dir}: already a Space")
        print(f"Start it with: cd {args.model_dir} && python app.py")
        if not space_metadata_present(Path(args.model_dir) / "README.md"):
            print("To run it on the Hub, README.md's metadata needs `sdk: gradio` (the model card's has none: add it)")
        return 0
    from .jobs import load_model_and_processor

    examples = app_magma.example_images_in(args.examples)  # a missing example is named before the model loads
    app_magma.require_gradio()
    model, processor = load_model_and_processor(args.model_dir, device=args.device)
    app_magma.launch(model, processor, host=args.host, port=args.port, examples=examples, max_images=args.max_images)
    return 0
