"""Tiny, fully offline building blocks for the tests: a byte-level BPE tokenizer, configs, images."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torchvision.transforms as T
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from magma_hf import MagmaConfig, MagmaImageProcessor, MagmaProcessor
from magma_hf.processing_magma import add_magma_special_tokens

EOS = "<|endoftext|>"
IMAGE = "<|image|>"
CORPUS = [
    "a photo of a cat sitting on a red sofa",
    "a dog running on the beach with a ball",
    "Q: What is in the picture? A: a small house with a garden",
    "the number seven is an odd number and four is even",
    "two people riding bicycles in a city street at night",
] * 20


def make_tokenizer(
    extra_corpus: list[str] | None = None, vocab_size: int = 320, with_image_token: bool = True
) -> PreTrainedTokenizerFast:
    """GPT-2 style: byte-level BPE, `<|endoftext|>` as bos/eos/pad, `<|image|>` as the special cls token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS + (extra_corpus or []), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    if with_image_token:
        add_magma_special_tokens(tokenizer)
    return tokenizer


def tiny_config(tokenizer=None, image_size: int = 64, adapter_config: dict | None = None, **kwargs) -> MagmaConfig:
    """A MAGMA of a few hundred thousand parameters: 2 GPT-J blocks of 64, a [1,1,1,1] ResNet of width 8."""
    tokenizer = tokenizer or make_tokenizer()
    eos_id = tokenizer.eos_token_id
    text_config = dict(
        n_embd=64,
        n_layer=2,
        n_head=4,
        rotary_dim=8,
        n_positions=512,
        vocab_size=len(tokenizer) + 6,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    text_config.update(kwargs.pop("text_config", {}))
    vision_config = {"layers": [1, 1, 1, 1], "width": 8, "image_size": image_size}
    vision_config.update(kwargs.pop("vision_config", {}))
    if adapter_config is None:
        adapter_config = {"mlp": {"adapter_type": "normal", "downsample_factor": 4}}
    return MagmaConfig(
        text_config=text_config,
        vision_config=vision_config,
        adapter_config=adapter_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        **kwargs,
    )


def make_processor(tokenizer=None, image_size: int = 64) -> MagmaProcessor:
    return MagmaProcessor(
        image_processor=MagmaImageProcessor(image_size=image_size), tokenizer=tokenizer or make_tokenizer()
    )


def random_image(seed: int, size=(80, 60), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(array).convert(mode)


def sample_photos() -> list[Image.Image]:
    """Real photographs shipped by scikit-learn (china.jpg and flower.jpg, 640x427)."""
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(array) for array in load_sample_images().images]


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def original_preprocess(image: Image.Image, size: int = 384) -> np.ndarray:
    """MAGMA's clip_preprocess: torchvision on the PIL image, resized and cropped in the image's own mode and converted
    to RGB only then (so a palette image is resized NEAREST, and RGBA loses its alpha without compositing)."""
    transform = T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            lambda cropped: cropped.convert("RGB"),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
    return transform(image).numpy()


def photo_variants() -> list[Image.Image]:
    """Real photographs cut to several sizes and aspect ratios, odd margins included."""
    variants = []
    for photo in sample_photos():
        variants += [
            photo,  # 640x427 landscape
            photo.crop((100, 0, 427, 427)),  # 327x427 portrait
            photo.crop((13, 7, 600, 300)),  # 587x293 wide
            photo.crop((0, 0, 387, 391)),  # almost square
            photo.resize((211, 157), Image.BICUBIC),  # smaller than the crop: upsampled
        ]
    return variants


def file_checksums(*roots) -> dict[str, str]:
    """sha256 of every regular file under `roots` (files or folders), keyed by path."""
    import hashlib
    from pathlib import Path

    checksums = {}
    for root in map(Path, roots):
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
        for path in paths:
            digest = hashlib.sha256()
            with open(path, "rb") as stream:
                for block in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(block)
            checksums[str(path)] = digest.hexdigest()
    return checksums


class files_unchanged:  # noqa: N801 - used as a context manager, like pytest.raises
    """Asserts that every file under `roots` that existed on entry is byte-identical on exit.

    `may_change` names files (paths or names relative to a root) the command is allowed to replace; with
    `no_new_files=True` the command must not add any file either (a failing command writes nothing). The check runs
    also when the block raises, so it wraps `pytest.raises` around a failing command:

        with files_unchanged(tmp_path), pytest.raises(ValueError, match="..."):
            convert(...)
    """

    def __init__(self, *roots, may_change=(), no_new_files: bool = False):
        from pathlib import Path

        self.roots = [Path(root) for root in roots]
        self.may_change = {str(Path(path)) for path in may_change}
        self.no_new_files = no_new_files

    def _allowed(self, path: str) -> bool:
        from pathlib import Path

        for root in self.roots:
            try:
                if str(Path(path).relative_to(root)) in self.may_change:
                    return True
            except ValueError:
                pass
        return path in self.may_change

    def __enter__(self):
        self.before = file_checksums(*self.roots)
        assert self.before or self.no_new_files, f"nothing to protect under {self.roots}: the test is set up wrong"
        return self

    def __exit__(self, *exc_info):
        after = file_checksums(*[root for root in self.roots if root.exists()])
        lost = [path for path in self.before if path not in after and not self._allowed(path)]
        changed = [
            path for path, digest in self.before.items()
            if path in after and after[path] != digest and not self._allowed(path)
        ]
        assert not lost, f"files deleted: {lost}"
        assert not changed, f"files changed: {changed}"
        if self.no_new_files:
            added = sorted(set(after) - set(self.before))
            assert not added, f"files written by a command that should write nothing: {added}"
        return False


WITHOUT_MAGMA_HF = """
import sys
sys.modules["magma_hf"] = None  # the package must not be importable here
try:
    import magma_hf  # noqa: F401
    raise SystemExit("magma_hf is importable")
except ImportError:
    pass
"""


def run_without_magma_hf(script: str, *args: str, cwd) -> dict:
    """Run `script` in a fresh Python that cannot import magma_hf (as where only a saved folder's code exists) and
    return the JSON object its last printed line holds."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    path = Path(cwd) / "without_magma_hf.py"
    path.write_text(WITHOUT_MAGMA_HF + script)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(Path(cwd) / "modules"))
    result = subprocess.run(
        [sys.executable, str(path), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


GREEDY = {"do_sample": False, "max_new_tokens": 6}


def greedy_texts(model, processor, image, prompts: list[str]) -> list[str]:
    """What `model.generate` (greedy, 6 tokens) and the processor's post-processing give for `image` and each prompt:
    the pipeline's expected answers."""
    texts = []
    for prompt in prompts:
        inputs = processor(images=[image], text=[prompt], return_tensors="pt")
        generated = model.generate(**inputs, **GREEDY)[:, inputs.input_ids.shape[1] :]
        texts.append(processor.post_process_image_text_to_text(generated)[0])
    return texts


def save_tiny_magma(folder, tokenizer, processor, magma_generation_defaults: bool = False, config=None):
    """A tiny MAGMA (seed 0) whose adapters are not the identity, saved with `processor` into `folder`; returns it.

    With `magma_generation_defaults` the folder gets MAGMA's generation config, as the converter and training write it.
    `config` replaces `tiny_config(tokenizer)` (another adapter layout or text size).
    """
    import torch

    from magma_hf import MagmaForConditionalGeneration
    from magma_hf.generation import magma_generation_config

    torch.manual_seed(0)
    model = MagmaForConditionalGeneration(config or tiny_config(tokenizer)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".magma_" in name:
                param.add_(torch.randn_like(param) * 0.1)
    if magma_generation_defaults:
        model.generation_config = magma_generation_config(model.config)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model


def save_tiny_gptj(folder, tokenizer, vocab_size: int, n_positions: int = 128) -> None:
    """A tiny GPT-J (seed 0; training's `lm_name`) saved into `folder`, the tokenizer's eos as bos, eos and pad."""
    import torch
    from transformers import GPTJConfig, GPTJForCausalLM

    eos = tokenizer.eos_token_id
    config = GPTJConfig(
        n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=n_positions, vocab_size=vocab_size,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    GPTJForCausalLM(config).save_pretrained(folder)


def accelerate_launch(
    arguments: list[str], cwd, processes: int = 2, timeout: int = 300, config_file=None, env: dict | None = None
):
    """`accelerate launch` of `arguments` (a script and its arguments, or `-m module ...`) over `processes` CPU
    processes: `--multi_gpu` is accelerate's torchrun launcher, which magma_hf runs on gloo when there is no GPU
    (`--cpu` would start one process); with `config_file`, that accelerate config instead (e.g. a DeepSpeed one). A
    free port, so that concurrent launches do not meet; `env` is added to the environment. Returns the
    `subprocess.CompletedProcess`."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    if config_file is None:
        setup = ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
                 "--dynamo_backend", "no"]  # fmt: skip
    else:
        setup = ["--config_file", str(config_file)]
    command = [sys.executable, "-m", "accelerate.commands.launch", *setup, "--main_process_port", str(port), *arguments]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# Source for a child process's script: `open_log` opens a `.jsonl` log for appending through a file that, at its second
# flush, writes all of the batch but the last newline and SIGKILLs the process, so the kill lands mid-append.
KILLED_AT_SECOND_FLUSH = """
class KilledAtSecondFlush:
    def __init__(self, file):
        self.file, self.pending, self.flushes = file, [], 0

    def write(self, text):
        self.pending.append(text)
        return len(text)

    def flush(self):
        text, self.pending, self.flushes = "".join(self.pending), [], self.flushes + 1
        if self.flushes == 2:
            self.file.write(text[:-1])
            self.file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        self.file.write(text)
        self.file.flush()

    def close(self):
        self.flush()
        self.file.close()


def open_log(path, mode="r", *args, **kwargs):
    file = open(path, mode, *args, **kwargs)
    return KilledAtSecondFlush(file) if mode == "a" and str(path).endswith(".jsonl") else file
"""


def save_answering_model(folder) -> None:
    """A tiny MAGMA (seed 0) saved with its processor into `folder`, its weights larger than the default init: its
    greedy answers then differ from question to question and image to image (evaluation and captioning tests)."""
    import torch

    from magma_hf import MagmaForConditionalGeneration

    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    model = MagmaForConditionalGeneration(tiny_config(tokenizer, text_config={"initializer_range": 0.3})).eval()
    model.save_pretrained(folder)
    make_processor(tokenizer).save_pretrained(folder)


def encoded_image(seed: int, size=(24, 20), format: str = "JPEG") -> bytes:
    """A random image's file bytes."""
    import io

    buffer = io.BytesIO()
    random_image(seed, size=size).save(buffer, format=format)
    return buffer.getvalue()


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    """A tar file of `(member name, bytes)`, in that order."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def write_webdataset_shards(folder, shards: int, per_shard: int, size=(24, 20), first_seed: int = 0) -> list[str]:
    """`shards` webdataset tars of `per_shard` samples each, named as img2dataset names them (`00000.tar`, keys
    `000000000`...): `.jpg`, `.txt` ("image <seed>") and `.json` (`{"key", "seed"}`) per sample. Returns the keys."""
    import io
    import json
    import tarfile
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for shard in range(shards):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for index in range(per_shard):
                seed = first_seed + shard * per_shard + index
                key = f"{shard:05d}{index:04d}"
                members = {
                    "jpg": encoded_image(seed, size),
                    "txt": f"image {seed}".encode(),
                    "json": json.dumps({"key": key, "seed": seed}).encode(),
                }
                for extension, payload in members.items():
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                keys.append(f"{shard:05d}.tar/{key}")
    return keys


def write_png(path, seed):
    """A random image as a PNG, lossless, so its pixels identify the seed exactly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    random_image(seed, size=(20, 16)).save(path, format="PNG")  # lossless, so pixels identify the image exactly


def write_img2dataset(root):
    """img2dataset's `files` output: 6 images with captions in .txt or in the .json, one without any, one corrupt."""
    import json

    shard = root / "00000"
    shard.mkdir(parents=True)
    for seed in range(3):
        write_png(shard / f"00000000{seed}.png", seed)
        (shard / f"00000000{seed}.json").write_text(json.dumps({"key": f"00000000{seed}", "url": f"http://x/{seed}"}))
        (shard / f"00000000{seed}.txt").write_text(f"image {seed}\n")
    write_png(shard / "000000003.png", 3)  # caption only in the json
    (shard / "000000003.json").write_text(json.dumps({"caption": "image 3", "key": "000000003"}))
    write_png(shard / "000000004.png", 4)  # no caption at all
    (shard / "000000004.json").write_text(json.dumps({"key": "000000004"}))
    (root / "00000_stats.json").write_text(json.dumps({"count": 5}))
    (shard / "000000005.png").write_bytes(b"corrupt")
    (shard / "000000005.txt").write_text("image 5")


# ---------------------------------------------------------------------------------------------------------------------
# img2dataset's own output (the `img2dataset_output` fixture of conftest.py)

IMG2DATASET_PER_SHARD = 8
IMG2DATASET_IMAGE_SIZE = 64
# Rows of the url list that fail, by what is behind them: missing files (404), files that are not images, a refused
# connection. Rows 24-27 all fail, so the last shard has no sample: an empty tar, a parquet of failed rows only.
IMG2DATASET_BROKEN = {3: "missing.png", 12: "corrupt.jpg", 24: "gone.webp", 25: "notes.txt", 26: None, 27: "lost.jpg"}


@dataclass
class Img2datasetRun:
    """What img2dataset downloaded: its two output folders, the captions of the images served (url order) and of
    the broken urls."""

    webdataset: Path
    parquet: Path
    captions: list[str]
    failed: list[str]


# docs/training.md's img2dataset example, as the tests run it: small, one process, 8 samples per shard.
IMG2DATASET_EXAMPLE_SETTINGS = {
    "image_size=384": f"image_size={IMG2DATASET_IMAGE_SIZE}",
    "processes_count=16": "processes_count=1",
    "thread_count=64": "thread_count=4",
    "number_sample_per_shard=10000": f"number_sample_per_shard={IMG2DATASET_PER_SHARD}",
}


def run_img2dataset(root: Path, example: str) -> Img2datasetRun:
    """Serve generated images on 127.0.0.1 (a `http.server` started and stopped here), write a url list (parquet:
    url, caption) and run `example` (docs/training.md's img2dataset Python example: `download(...)` in one process
    after IMG2DATASET_EXAMPLE_SETTINGS) into `webdataset` and `parquet` output."""
    import functools
    import http.server
    import signal
    import socket
    import threading

    import pyarrow as pa
    import pyarrow.parquet as pq

    www = root / "www"
    www.mkdir(parents=True)
    (www / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (www / "notes.txt").write_text("not an image")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(www)))
    base = f"http://127.0.0.1:{server.server_address[1]}"
    with socket.socket() as closed:  # a port nothing listens on: the connection is refused
        closed.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{closed.getsockname()[1]}/refused.jpg"
    urls, row_captions = [], []
    for row in range(28):
        if row in IMG2DATASET_BROKEN:
            name = IMG2DATASET_BROKEN[row]
            urls.append(refused if name is None else f"{base}/{name}")
            row_captions.append(f"a broken link number {row}")
        else:
            random_image(row, size=(40 + row, 48)).save(www / f"{row}.png")
            urls.append(f"{base}/{row}.png")
            row_captions.append(f"a photo number {row}")
    pq.write_table(pa.table({"url": urls, "caption": row_captions}), root / "urls.parquet")

    for old, new in {**IMG2DATASET_EXAMPLE_SETTINGS, '"urls.parquet"': repr(str(root / "urls.parquet"))}.items():
        assert old in example, f"docs/training.md's img2dataset example no longer says {old}"
        example = example.replace(old, new)
    environment = {"no_proxy": "127.0.0.1", "NO_PROXY": "127.0.0.1"}  # urllib must not send 127.0.0.1 to a proxy
    saved = {name: os.environ.get(name) for name in environment}
    sigint = signal.getsignal(signal.SIGINT)  # download() installs its own
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        os.environ.update(environment)
        for output_format in ("webdataset", "parquet"):
            code = example.replace('"webdataset"', repr(output_format))
            code = code.replace('"/data/laion-shards"', repr(str(root / output_format)))
            exec(compile(code, "docs/training.md", "exec"), {"__name__": "__main__"})  # spawn imports no script
    finally:
        signal.signal(signal.SIGINT, sigint)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.shutdown()
        server.server_close()
    failed = [caption for row, caption in enumerate(row_captions) if row in IMG2DATASET_BROKEN]
    served = [caption for row, caption in enumerate(row_captions) if row not in IMG2DATASET_BROKEN]
    return Img2datasetRun(root / "webdataset", root / "parquet", served, failed)


def img2dataset_samples(folder: Path) -> list[tuple[str, bytes, str]]:
    """`(<shard>/<key>, image bytes, caption)` of the successful samples of img2dataset output, in shard and file
    order, read with tarfile / pyarrow alone (what the readers under test should find)."""
    import tarfile

    import pyarrow.parquet as pq

    samples = []
    for tar_path in sorted(folder.glob("*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, extension = member.name.split(".", 1)
                members.setdefault(key, {})[extension] = tar.extractfile(member).read()
        samples += [(f"{tar_path.name}/{key}", m["jpg"], m["txt"].decode()) for key, m in members.items()]
    if samples:
        return samples
    for parquet_path in sorted(folder.glob("*.parquet")):
        rows = [row for row in pq.read_table(parquet_path).to_pylist() if row["status"] == "success"]
        samples += [(f"{parquet_path.name}/{row['key']}", row["jpg"], row["caption"]) for row in rows]
    return samples
