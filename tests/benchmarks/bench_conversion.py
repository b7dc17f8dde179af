"""Benchmark the converter on a full-size synthetic checkpoint (not part of the test suite).

    python -m tests.benchmarks.bench_conversion --workdir /tmp/magma-benchmark

1. Writes `mp_rank_00_model_states.pt` in the original layout (tests/original_magma.py): GPT-J-6B + CLIP RN50x16,
   MLP adapters, float16 random values, the fork's attention buffers, the alias keys, DeepSpeed's bookkeeping; about
   12 GB. The structure is saved first with `torch.serialization.skip_data` (FakeTensors, no memory), then each tensor
   is filled in place through a shared memory map, one at a time.
2. Times copying that file (`shutil.copyfile`, then `fsync`, since the converter syncs its output too), with the
   source read once beforehand so that both the copy and the conversion start from the same page-cache state.
3. Converts it in a subprocess (`python -m magma_hf convert`, default settings: MAGMA_v1, float16, 2GB shards,
   verification on) and reports its wall time and peak RSS (`ru_maxrss` of that process, from `wait4`).
4. With --also-save-file, converts it again with each shard written by `safetensors.torch.save_file` instead of the
   streaming writer (the shard's tensors materialised from the memory map: views of it where no cast or padding is
   needed, the rest in memory; their pages released once the shard is written), all else the same.

Needs about 26 GB free in --workdir (checkpoint + copy or output). Everything is written into a new folder
`magma-benchmark-XXXX` inside --workdir, so that a real checkpoint or anything else already there is never touched;
all in it but results.json is deleted at the end unless --keep.
The tokenizer is a GPT-2-sized stand-in (50257 tokens + <|image|>) built offline: only its size matters here.
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from magma_hf.conversion.checkpoint import CHECKPOINT_FILENAME
from magma_hf.conversion.safetensors_writer import MappedFile
from tests.original_magma import (
    OriginalModel,
    alias_keys,
    deepspeed_checkpoint,
    original_layout,
    rotary_tables,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

GB = 1e9


def gpt2_sized_tokenizer(folder: Path) -> Path:
    """Byte-level BPE with GPT-2's size and special-token ids (<|endoftext|> = 50256); the rest are filler tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(sorted(alphabet))}
    vocab.update({f"filler{i}": len(vocab) + i for i in range(50256 - len(vocab))})
    vocab["<|endoftext|>"] = 50256
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    tokenizer.add_special_tokens({"cls_token": "<|image|>"})
    assert len(tokenizer) == 50258 and tokenizer.convert_tokens_to_ids("<|image|>") == 50257
    tokenizer.save_pretrained(folder)
    return folder


def write_synthetic_checkpoint(path: Path, model: OriginalModel) -> int:
    """The original layout at full size, float16, filled tensor by tensor; returns the number of tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    layout = original_layout(model)
    dtypes = {
        "causal_mask": torch.bool,
        "count": torch.int64,
    }
    with FakeTensorMode():
        tensors = {
            key: torch.empty(shape, dtype=dtypes.get(kind, torch.float16)) for key, (shape, kind) in layout.items()
        }
    state_dict = dict(tensors)
    state_dict.update({alias: tensors[original] for alias, original in alias_keys(layout).items()})
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(deepspeed_checkpoint(state_dict), path)

    previous = torch.serialization.get_default_mmap_options()
    torch.serialization.set_default_mmap_options(mmap.MAP_SHARED)
    try:
        mapped = torch.load(path, mmap=True, weights_only=True)["module"]
    finally:
        torch.serialization.set_default_mmap_options(previous)
    pages = MappedFile(path)  # closed with the process
    sin, cos = rotary_tables(model)
    causal = torch.ones(model.positions, model.positions, dtype=torch.bool).tril().view(1, 1, *[model.positions] * 2)
    generator = torch.Generator().manual_seed(0)
    for n, (key, (shape, kind)) in enumerate(layout.items()):
        tensor = mapped[key]
        with torch.no_grad():
            if kind == "causal_mask":
                tensor.copy_(causal)
            elif kind == "masked_bias":
                tensor.fill_(-1e9)  # -inf in float16, as DeepSpeed's .half() left it
            elif kind == "scale_attn":
                tensor.fill_(math.sqrt(model.head_dim))
            elif kind in ("sin", "cos"):
                tensor.copy_(sin if kind == "sin" else cos)
            elif kind == "count":
                tensor.fill_(150000)
            elif kind == "variance":
                tensor.uniform_(0.5, 1.5, generator=generator)
            elif kind == "ln_weight":
                tensor.normal_(1.0, 0.1, generator=generator)
            else:
                fan_in = math.prod(shape[1:]) if len(shape) > 1 else 400
                tensor.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
        pages.release(tensor)  # dirty shared pages stay in the page cache and are written back by the kernel
        if n % 200 == 0:
            print(f"  filled {n}/{len(layout)} tensors", flush=True)
    del mapped
    return len(layout)


def read_through(path: Path) -> float:
    """Read the file once (page cache warm-up, as far as memory allows); returns seconds."""
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as stream:
        buffer = bytearray(64 << 20)
        while stream.readinto(buffer):
            pass
    return time.perf_counter() - start


def timed_copy(source: Path, target: Path) -> tuple[float, float]:
    """Seconds for `shutil.copyfile` alone and for copy + fsync."""
    start = time.perf_counter()
    shutil.copyfile(source, target)
    copied = time.perf_counter()
    descriptor = os.open(target, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    return copied - start, time.perf_counter() - start


# `magma-hf convert` with each shard written by `safetensors.torch.save_file` (the comparison of --also-save-file)
SAVE_FILE_CONVERSION = """
import sys
import torch
from safetensors.torch import save_file
import magma_hf.conversion.safetensors_writer as writer
from magma_hf.cli import main

def write_with_save_file(path, specs, produce, done=lambda spec: None, metadata=None):
    tensors = {}
    for spec in specs:
        parts = [writer.part_tensor(part).reshape(-1) for part in produce(spec)]
        flat = parts[0] if len(parts) == 1 else torch.cat(parts)
        tensors[spec.name] = flat.view(spec.shape)
    save_file(tensors, path, metadata=metadata or {"format": "pt"})
    del tensors
    for spec in specs:
        done(spec)

writer.write_safetensors_file = write_with_save_file
sys.exit(main(sys.argv[1:]))
"""


def timed_conversion(checkpoint: Path, output: Path, tokenizer: Path, verify: bool, save_file: bool = False) -> dict:
    """Run `python -m magma_hf convert` (with `save_file`: shards by safetensors' `save_file`) and return its wall
    time, peak RSS and printed report."""
    program = ["-c", SAVE_FILE_CONVERSION] if save_file else ["-m", "magma_hf"]
    command = [
        sys.executable, *program, "convert", "--checkpoint", str(checkpoint), "--output", str(output),
        "--tokenizer", str(tokenizer), "--verify" if verify else "--no-verify",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    stdout, stderr = process.stdout.read(), process.stderr.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"conversion failed ({code}):\n{stdout}\n{stderr[-3000:]}")
    return {"seconds": seconds, "peak_rss_gb": usage.ru_maxrss * 1024 / GB, "report": stdout.strip()}


def folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/magma-conversion-benchmark")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and the output")
    parser.add_argument("--also-without-verify", action="store_true", help="time a second conversion with --no-verify")
    parser.add_argument(
        "--also-save-file", action="store_true", help="time a conversion writing each shard with safetensors' save_file"
    )
    args = parser.parse_args()

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="magma-benchmark-", dir=workdir))  # its own: nothing there is overwritten
    model = OriginalModel()  # MAGMA_v1: GPT-J-6B + RN50x16
    expected_bytes = sum(
        math.prod(shape) * (1 if kind == "causal_mask" else 8 if kind == "count" else 2)
        for shape, kind in original_layout(model).values()
    )
    free = shutil.disk_usage(workdir).free
    needed = 2 * expected_bytes + 2 * GB
    print(f"workdir {workdir}: {free / GB:.1f} GB free, {needed / GB:.1f} GB needed (checkpoint + copy or output)")
    if free < needed:
        print("not enough disk space", file=sys.stderr)
        return 1

    checkpoint = workdir / CHECKPOINT_FILENAME
    copy = workdir / "copy.pt"
    output = workdir / "converted"
    results = {}
    try:
        start = time.perf_counter()
        n_tensors = write_synthetic_checkpoint(checkpoint, model)
        descriptor = os.open(checkpoint, os.O_RDONLY)
        os.fsync(descriptor)
        os.close(descriptor)
        results["write_seconds"] = time.perf_counter() - start
        size = checkpoint.stat().st_size
        print(f"synthetic checkpoint: {n_tensors} tensors (+ aliases), {size / GB:.2f} GB, "
              f"written and synced in {results['write_seconds']:.1f} s", flush=True)  # fmt: skip
        tokenizer = gpt2_sized_tokenizer(workdir / "tokenizer")

        results["warm_read_seconds"] = read_through(checkpoint)
        results["copy_seconds"], results["copy_fsync_seconds"] = timed_copy(checkpoint, copy)
        copy.unlink()
        print(f"copy: {results['copy_seconds']:.1f} s (+ fsync: {results['copy_fsync_seconds']:.1f} s)", flush=True)

        read_through(checkpoint)
        results["convert"] = timed_conversion(checkpoint, output, tokenizer, verify=True)
        results["output_gb"] = folder_size(output) / GB
        print(results["convert"]["report"], flush=True)
        if args.also_without_verify:
            shutil.rmtree(output)
            read_through(checkpoint)
            results["convert_no_verify"] = timed_conversion(checkpoint, output, tokenizer, verify=False)
        if args.also_save_file:
            shutil.rmtree(output)
            read_through(checkpoint)
            results["convert_save_file"] = timed_conversion(checkpoint, output, tokenizer, verify=True, save_file=True)
            print(results["convert_save_file"]["report"], flush=True)

        convert = results["convert"]
        print("\n== results ==")
        print(f"checkpoint             {size / GB:.2f} GB on disk, output {results['output_gb']:.2f} GB")
        print(f"read (warm-up)         {results['warm_read_seconds']:.1f} s")
        copy_seconds, synced_seconds = results["copy_seconds"], results["copy_fsync_seconds"]
        print(f"copy                   {copy_seconds:.1f} s; copy + fsync {synced_seconds:.1f} s")
        print(
            f"convert (verify on)    {convert['seconds']:.1f} s = {convert['seconds'] / synced_seconds:.2f}x copy + "
            f"fsync, {convert['seconds'] / copy_seconds:.2f}x copy; peak RSS {convert['peak_rss_gb']:.2f} GB"
        )
        if "convert_no_verify" in results:
            other = results["convert_no_verify"]
            print(f"convert (no verify)    {other['seconds']:.1f} s = "
                  f"{other['seconds'] / results['copy_fsync_seconds']:.2f}x copy + fsync; "
                  f"peak RSS {other['peak_rss_gb']:.2f} GB")  # fmt: skip
        if "convert_save_file" in results:
            other = results["convert_save_file"]
            print(f"convert (save_file)    {other['seconds']:.1f} s = "
                  f"{other['seconds'] / results['copy_fsync_seconds']:.2f}x copy + fsync, "
                  f"{other['seconds'] / copy_seconds:.2f}x copy; peak RSS {other['peak_rss_gb']:.2f} GB")  # fmt: skip
        (workdir / "results.json").write_text(json.dumps(results, indent=2))
    finally:
        if not args.keep:
            for path in (checkpoint, copy):
                path.unlink(missing_ok=True)
            shutil.rmtree(output, ignore_errors=True)
            shutil.rmtree(workdir / "tokenizer", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
