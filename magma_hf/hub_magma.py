"""What makes a saved MAGMA folder a Hub repo (the custom pipeline entry, a model card, saving that leaves the live
objects as they were), and what a local folder must hold to load from it, checked before transformers reads it."""

import copy
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedConfig
from transformers.pipelines import PIPELINE_REGISTRY

from .weights_magma import MODEL_WEIGHTS_FILE, MODEL_WEIGHTS_INDEX_FILE

# transformers 5 redirects `image-to-text` to `image-text-to-text`: `import magma_hf` registers MAGMA's pipeline there.
PIPELINE_TASK = "image-text-to-text"
PIPELINE_CLASS_NAME = "MagmaImageToTextPipeline"
# For `trust_remote_code=True` without the package: the saved config names the pipeline under both task names
# (transformers looks a custom task up by the name the user typed, before the redirect).
CUSTOM_PIPELINES = {
    task: {"impl": f"pipeline_magma.{PIPELINE_CLASS_NAME}", "pt": ["AutoModelForImageTextToText"], "type": "multimodal"}
    for task in ("image-to-text", PIPELINE_TASK)
}
AUTO_MAP_EXTRAS = {"AutoModel": "modeling_magma.MagmaModel"}


def magma_pipeline_is_registered() -> bool:
    """Whether `import magma_hf` registered MAGMA's pipeline in this process (not so where only the code exported
    into a saved folder runs)."""
    impl = PIPELINE_REGISTRY.supported_tasks.get(PIPELINE_TASK, {}).get("impl")
    return getattr(impl, "__name__", None) == PIPELINE_CLASS_NAME


@contextmanager
def auto_map_left_unchanged(*holders: dict) -> Iterator[None]:
    """Puts each holder's `auto_map` back as it was on entry, also when the block raises. The holders are the attribute
    dicts (`vars(obj)`, a tokenizer's `init_kwargs`) on which transformers' code export records `auto_map` to write it.

    MAGMA's rule: `auto_map` names a saved folder's code and belongs to the saved files. Saving writes it and leaves
    the live object as it was; loading drops it (configs: where `import magma_hf` registered MAGMA, see
    `MagmaConfig.__post_init__`), so that every save/load round trip gives back an equal object."""
    saved = [(holder, copy.deepcopy(holder.get("auto_map"))) for holder in holders]
    try:
        yield
    finally:
        for holder, auto_map in saved:
            holder.pop("auto_map", None)
            if auto_map is not None:
                holder["auto_map"] = auto_map


@contextmanager
def config_left_unchanged(config: PreTrainedConfig) -> Iterator[None]:
    """Puts the config's own attributes back as they were on entry, also when the block raises: transformers' saving
    sets `architectures`, `dtype` and (code export) `auto_map` on the live config to write them, and they belong to
    the saved files."""
    attributes = vars(config)
    before = {key: copy.deepcopy(value) for key, value in attributes.items() if not isinstance(value, PreTrainedConfig)}
    try:
        yield
    finally:
        for key in set(attributes) - set(before):
            if not isinstance(attributes[key], PreTrainedConfig):
                del attributes[key]
        attributes.update(before)


# What MAGMA is built on: GPT-J-6B and CLIP RN50x16's image encoder (on the Hub as timm's copy of OpenAI's weights,
# which open_clip also downloads).
BASE_MODELS = ("EleutherAI/gpt-j-6b", "timm/resnet50x16_clip.openai")

MODEL_FILES_JSON = ("config.json", "generation_config.json", MODEL_WEIGHTS_INDEX_FILE)
PROCESSOR_FILES_JSON = (
    "processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json",
)

# What a MAGMA folder's processor is read from: each entry is one file or its alternatives (GPT-2's vocab.json and
# merges.txt make the same tokenizer as tokenizer.json).
PROCESSOR_FILES_NEEDED = (
    ("tokenizer.json", ("vocab.json", "merges.txt")),
    ("tokenizer_config.json",),  # its end-of-text, padding and <|image|> tokens: without it there are none
    ("processor_config.json", ("preprocessor_config.json",)),  # the image size and normalisation
)


def missing_files(folder: str | os.PathLike, needed=PROCESSOR_FILES_NEEDED) -> list[str]:
    """The entries of `needed` (a file, then its alternatives) of which `folder` holds none, as names to show."""
    folder, missing = Path(folder), []
    for name, *alternatives in needed:
        if not any(all((folder / each).is_file() for each in names) for names in [(name,), *alternatives]):
            missing.append(name + "".join(f" (nor {' and '.join(names)})" for names in alternatives))
    return missing


def check_processor_files(folder: str | os.PathLike) -> None:
    """Raise an `OSError` naming the local `folder` and the processor files it lacks: transformers' own errors for
    them advise installing sentencepiece, name another file, or (no tokenizer_config.json) none at all, loading a
    tokenizer without an end-of-text token."""
    missing = missing_files(folder)
    if missing:
        raise OSError(
            f"{Path(folder)} has no {', no '.join(missing)}: the files of the model's processor (tokenizer and image "
            "settings), which a MAGMA model folder holds beside the model's (the converter and `magma-hf train` save "
            "both; MagmaProcessor.save_pretrained writes them). Copy them from the folder the model came from, or "
            "save its processor into this folder."
        )


def check_json_files(folder: str | os.PathLike, names: tuple[str, ...]) -> None:
    """Raise an `OSError` naming each of `names` in a local `folder` that exists but is not valid JSON (a truncated
    download or copy): transformers reports some as a bare JSONDecodeError and silently skips a broken
    generation_config.json."""
    broken = []
    for name in names:
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            broken.append(f"{name} ({path.stat().st_size} bytes: {error})")
    if broken:
        raise OSError(
            f"{', '.join(broken)} in {folder} is not valid JSON: probably an interrupted download or copy. "
            "Download or copy it again."
        )


def broken_weight_files_message(folder: Path, error: Exception) -> str:
    """Which `.safetensors` files in `folder` cannot be opened, their sizes and safetensors' reason, in one line."""
    broken = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):
                pass
        except (SafetensorError, OSError) as reason:
            broken.append(f"{path.name} ({path.stat().st_size} bytes: {reason})")
    if not broken:
        return f"Loading the weights in {folder} failed: {error}"
    return (
        f"The weight file(s) {', '.join(broken)} in {folder} are not complete safetensors files: probably an "
        "interrupted download or copy. Download or copy them again."
    )


@contextmanager
def model_folder_checked(
    pretrained_model_name_or_path: str | os.PathLike | None, subfolder: str | None, has_config: bool
) -> Iterator[None]:
    """Around a model's `from_pretrained`: a local folder's files are checked first, and a safetensors error names the
    broken files. A Hub repo id is transformers' to resolve."""
    folder = None if pretrained_model_name_or_path is None else Path(pretrained_model_name_or_path, subfolder or "")
    folder = folder if folder is not None and folder.is_dir() else None
    # Without config.json transformers builds the default config (GPT-J-6B, 24 GB in float32) and only then finds
    # that the weights do not fit.
    if folder is not None and not has_config and not (folder / "config.json").is_file():
        raise OSError(
            f"{folder} has no config.json: a MAGMA model folder holds config.json next to its weights "
            f"({MODEL_WEIGHTS_FILE}, or the shards and {MODEL_WEIGHTS_INDEX_FILE})"
        )
    if folder is not None:
        check_json_files(folder, MODEL_FILES_JSON)
    try:
        yield
    except SafetensorError as error:
        # safetensors says "incomplete metadata, file not fully covered", not which of the shards it was reading
        if folder is None:
            raise
        raise OSError(broken_weight_files_message(folder, error)) from error


MODEL_CARD_BODY = """
# MAGMA

MAGMA (Eichenberg et al., [arXiv 2112.05253](https://arxiv.org/abs/2112.05253)) augments a frozen GPT-J with vision:
a CLIP ResNet image encoder (attention pooling removed, one token per 32x32 pixels) and a linear projection +
LayerNorm put image embeddings in front of, or between, the text embeddings; bottleneck adapters in the language
model's blocks are trained with a captioning loss while GPT-J's own weights stay unchanged.

This folder carries its code (`trust_remote_code=True`), or use it with `pip install magma-hf` and `import magma_hf`.

```python
from transformers import pipeline

captioner = pipeline("image-text-to-text", model="{repo}", trust_remote_code=True)
captioner("photo.jpg", generate_kwargs={{"do_sample": False}})              # a caption
captioner("photo.jpg", text="Q: What is in the picture? A:")               # an answer
```

With `import magma_hf`, `trust_remote_code` is not needed. `"image-to-text"`, which transformers 5 redirects to
`"image-text-to-text"`, names the same pipeline.

The shipped generation config uses the original's settings (temperature 0.7, top-p 0.9) as true nucleus sampling;
the original's filter in effect sampled at temperature 0.7 without a nucleus (`top_p=1.0, temperature=0.7, top_k=0`
reproduces it wherever the most likely token holds at least 10%).
"""


def write_model_card(save_directory: str | os.PathLike) -> bool:
    """Write `README.md` with Hub metadata unless the folder already has one (the user's card is kept).

    Written under a temporary name and linked into place, so that a reader never sees half a card and a card that
    appears meanwhile is not replaced. This is the rule of a plain `save_pretrained` into a folder where nothing records
    what is ours (and code the Hub folder carries cannot import `magma_hf.folders`): the commands that write into a
    user's folder (the converter, `magma-hf train`) save into an empty staging folder, where the card is always
    written, and their manifest decides at installation whether a README.md there is theirs (`folders.FolderWriter`).
    """
    path = Path(save_directory) / "README.md"
    if path.exists():
        return False
    # pipeline_tag: transformers 5's task name, which the Hub and `pipeline(model=repo)` read
    card_data = ModelCardData(
        library_name="transformers", pipeline_tag=PIPELINE_TASK, license="mit", base_model=list(BASE_MODELS),
        tags=["magma", "vision-language", PIPELINE_TASK, "custom_code"],
    )
    body = MODEL_CARD_BODY.format(repo=Path(save_directory).name)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.writing")
    ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}").save(temporary)
    try:
        os.link(temporary, path)  # fails, instead of replacing, where a README.md appeared meanwhile
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: rename, checking once more just before
        if path.exists():
            return False
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return True


@contextmanager
def saving_as_hub_repo(
    config: PreTrainedConfig, save_directory: str | os.PathLike, exporting_code: bool, is_main_process: bool = True
) -> Iterator[None]:
    """Around a model's `save_pretrained`: with the code export on, the folder also gets `custom_pipelines`
    (`image-to-text` and `image-text-to-text`), an `AutoModel` entry and a model card, and is a Hub repo. What saving
    writes into config.json (these, `auto_map`, `architectures`, `dtype`) belongs to the saved files: the live config
    is left as it was."""
    with config_left_unchanged(config):
        if exporting_code:
            config.custom_pipelines = copy.deepcopy(CUSTOM_PIPELINES)
            config.auto_map = {**(getattr(config, "auto_map", None) or {}), **AUTO_MAP_EXTRAS}
        yield
    if exporting_code and is_main_process:
        write_model_card(save_directory)
