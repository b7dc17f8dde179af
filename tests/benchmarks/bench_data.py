"""Training data: webdataset shards streamed where they lie (`magma_hf.data.streaming`) against today's map-style
path (`load_image_caption_dataset`, which rewrites tar shards into the 🤗 datasets Arrow cache), at two sizes.

The data: img2dataset-style `.tar` shards (`00000.tar`, keys `000000000`, `.jpg` / `.txt` / `.json` per sample,
`--per-shard` samples each) of 384 x (288..512) px JPEGs, quality 90, about 55 KB each: a pool of `--pool` distinct
photographs (scikit-learn's two sample photos cropped, scaled, flipped, colour-jittered, with sensor-like noise)
whose bytes are reused under distinct keys with distinct captions. Made once in `--workdir` and reused by later runs.

Each measurement is a fresh process (so its memory is that path's alone) that builds the dataset (the stream, or
the map-style dataset), a data loader (batch `--batch-size`, `MagmaDataCollator` with MAGMA's image preprocessing
at 384 px and a tiny tokenizer) and reads:

- time to the first batch: from building the dataset to the first batch out of the data loader (1 worker), the
  median of `--repeats` (streamed) / `--map-repeats` fresh processes; and the CPU time the main process and the
  worker spent on it (which a loaded machine changes less);
- peak memory: the peak RSS (VmHWM) of the main process (and how much of it came after the imports) and of the
  data-loader worker; also, sampled every 0.1 s, their sum, their PSS sum (which moves with how much of the forked
  worker's heap copy-on-write has unshared, so it is noisy) and their anonymous (not file-backed) RSS;
- bytes written: the size of what the process left in its own fresh HF_HOME / HF_DATASETS_CACHE / TMPDIR /
  XDG_CACHE_HOME folders, plus the kernel's write_bytes of the main process and its workers; the shard folder is
  checked unchanged (names, sizes, mtimes);
- throughput of one data-loader worker (JPEG decode + MAGMA preprocessing + tokenization + collation): `--batches`
  batches after the first, per wall second and per CPU second of the worker (the second is less sensitive to a
  loaded machine); then the same with 2 workers (samples/s of both together).

Then what one GPU needs: the FLOPs of one MAGMA_v1 training sample (GPT-J-6B frozen: forward and input gradients;
MLP adapters and projection trained; CLIP RN50x16 at 384 px trained: forward and full backward) counted with
`torch.utils.flop_counter.FlopCounterMode` on the full-size model built on the meta device (no weights, no memory),
for 144 image tokens + `--caption-tokens` caption tokens; at `--peak-tflops` (H100 SXM, bf16 dense) and `--mfu` the
samples/s one GPU consumes, and the data-loader workers that feed it at the measured rate.

    python -m tests.benchmarks.bench_data [--sizes 4000 40000] [--workdir /tmp/magma-bench-data] [--skip-map-large]
        [--json out.json]
"""

import argparse
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

PATHS = ("streamed", "map-style")
WORDS = {
    "who": ["a man", "a woman", "two children", "an old fisherman", "a tourist", "a group of friends", "a dog"],
    "what": ["standing", "walking", "sitting", "taking a photo", "looking out", "resting", "waiting"],
    "where": ["in front of a chinese temple", "next to a field of yellow flowers", "on a stone bridge", "by the lake",
              "under a red roof", "in a garden full of blossoms", "near an old pagoda", "on a sunny afternoon"],
    "extra": ["", "", " with mountains in the background", " on a cloudy day", " in the summer of 2014",
              " during the spring festival", " seen from above", ", close-up"],
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Data


def make_pool(count: int, seed: int = 0) -> list[tuple[bytes, int, int]]:
    """`count` distinct photo-like JPEGs (bytes, width, height): 384 on one side, 288..512 on the other."""
    import numpy as np
    from PIL import Image, ImageEnhance
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(array) for array in load_sample_images().images]  # 640 x 427 each
    rng = np.random.default_rng(seed)
    pool = []
    for index in range(count):
        photo = photos[index % len(photos)]
        other = int(rng.integers(288, 513))
        width, height = (other, 384) if rng.random() < 0.7 else (384, other)
        crop_height = int(photo.height * rng.uniform(0.5, 1.0))
        crop_width = int(crop_height * width / height)
        if crop_width > photo.width:
            crop_width, crop_height = photo.width, int(photo.width * height / width)
        left = int(rng.integers(0, photo.width - crop_width + 1))
        top = int(rng.integers(0, photo.height - crop_height + 1))
        image = photo.crop((left, top, left + crop_width, top + crop_height)).resize((width, height), Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Color, ImageEnhance.Contrast):
            image = enhance(image).enhance(rng.uniform(0.8, 1.2))
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(5, 9), (height, width, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        pool.append((buffer.getvalue(), width, height))
    return pool


def caption(rng) -> str:
    words = {name: choices[int(rng.integers(len(choices)))] for name, choices in WORDS.items()}
    return f"{words['who']} {words['what']} {words['where']}{words['extra']}".capitalize()


def write_shard(path: Path, shard: int, per_shard: int, pool, seed: int) -> None:
    """One img2dataset-style shard: `<key>.jpg`, `<key>.txt`, `<key>.json` per sample, key = shard * 10^4 + index."""
    import numpy as np

    rng = np.random.default_rng([seed, shard])
    partial = path.with_suffix(".tar.partial")
    with tarfile.open(partial, "w") as tar:
        for index in range(per_shard):
            key = f"{shard:05d}{index:04d}"
            image, width, height = pool[int(rng.integers(len(pool)))]
            text = caption(rng)
            metadata = {"url": f"https://example.com/{key}.jpg", "key": key, "status": "success",
                        "error_message": None, "width": width, "height": height, "original_width": width,
                        "original_height": height, "caption": text}  # fmt: skip
            for extension, payload in (("jpg", image), ("txt", text.encode()), ("json", json.dumps(metadata).encode())):
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mtime = len(payload), 1_700_000_000
                tar.addfile(info, io.BytesIO(payload))
    partial.rename(path)


def prepare_data(workdir: Path, sizes: list[int], per_shard: int, pool_size: int) -> dict[int, Path]:
    """`workdir/all/` holds the shards of the largest size; `workdir/shards-<n>/` hard-links the first n / per_shard
    of them. Reused when present."""
    shards_needed = max(math.ceil(size / per_shard) for size in sizes)
    everything = workdir / "all"
    everything.mkdir(parents=True, exist_ok=True)
    manifest = everything / "manifest.json"
    settings = {"per_shard": per_shard, "pool": pool_size, "version": 1}
    if manifest.is_file() and json.loads(manifest.read_text()) != settings:
        raise SystemExit(f"{everything} was made with {json.loads(manifest.read_text())}, not {settings}: use another "
                         "--workdir or delete it")  # fmt: skip
    missing = [shard for shard in range(shards_needed) if not (everything / f"{shard:05d}.tar").is_file()]
    if missing:
        started = time.perf_counter()
        pool = make_pool(pool_size)
        mean_kb = sum(len(item[0]) for item in pool) / len(pool) / 1e3
        print(f"Made {len(pool)} JPEGs (mean {mean_kb:.1f} KB) in {time.perf_counter() - started:.1f} s", flush=True)
        for shard in missing:
            write_shard(everything / f"{shard:05d}.tar", shard, per_shard, pool, seed=0)
        manifest.write_text(json.dumps(settings))
        print(f"Wrote {len(missing)} shards in {time.perf_counter() - started:.1f} s", flush=True)
    folders = {}
    for size in sizes:
        if size % per_shard:
            raise SystemExit(f"--sizes must be multiples of --per-shard ({per_shard}), got {size}")
        folder = workdir / f"shards-{size}"
        folder.mkdir(exist_ok=True)
        for shard in range(size // per_shard):
            name = f"{shard:05d}.tar"
            if not (folder / name).exists():
                os.link(everything / name, folder / name)
        folders[size] = folder
    return folders


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def snapshot(folder: Path) -> list[tuple[str, int, int]]:
    return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir())


# ---------------------------------------------------------------------------------------------------------------------
# One measurement (a fresh process)


def _proc_fields(pid: int, name: str, fields: tuple[str, ...]) -> dict[str, int]:
    values = {}
    try:
        with open(f"/proc/{pid}/{name}") as file:
            for line in file:
                key, _, rest = line.partition(":")
                if key in fields:
                    values[key] = int(rest.split()[0])
    except OSError:
        pass
    return values


class TreeSampler:
    """Every `interval` s: PSS and RSS of this process and its children (the data-loader workers), summed; each
    process's peak RSS (VmHWM), CPU time and kernel write_bytes, as last seen."""

    def __init__(self, interval: float = 0.1):
        import psutil

        self.me = psutil.Process()
        self.interval = interval
        self.peak_pss = self.peak_rss = 0
        self.peak_anon = {"main": 0, "workers": 0}
        self.seen: dict[int, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def workers(self):
        return self.me.children(recursive=True)

    def sample(self) -> None:
        pss = rss = 0
        for process in [self.me, *self.workers()]:
            memory = _proc_fields(process.pid, "smaps_rollup", ("Rss", "Pss"))
            if not memory:
                continue
            pss, rss = pss + memory["Pss"] * 1024, rss + memory["Rss"] * 1024
            entry = self.seen.setdefault(process.pid, {})
            status = _proc_fields(process.pid, "status", ("VmHWM", "RssAnon"))
            entry["hwm"] = status.get("VmHWM", 0) * 1024
            which = "main" if process.pid == self.me.pid else "workers"
            self.peak_anon[which] = max(self.peak_anon[which], status.get("RssAnon", 0) * 1024)
            entry["write_bytes"] = _proc_fields(process.pid, "io", ("write_bytes",)).get("write_bytes", 0)
            try:
                times = process.cpu_times()
                entry["cpu"] = times.user + times.system
            except Exception:  # exited in between
                pass
        self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)

    def _run(self):
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self):
        self._stop.set()
        self._thread.join()

    def worker_cpu(self) -> float:
        total = 0.0
        for process in self.workers():
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except Exception:
                pass
        return total


def measure(path: str, folder: str, batch_size: int, batches: int, result_file: str, first_only: bool) -> None:
    """The child process: read `folder` by `path`, write the figures to `result_file` (with `first_only` the time to
    the first batch and the memory until then)."""
    import psutil

    started_process = psutil.Process().create_time()
    import torch
    from torchdata.stateful_dataloader import StatefulDataLoader

    from magma_hf.data import load_image_caption_dataset
    from magma_hf.data.streaming import build_stream
    from magma_hf.training.collator import MagmaDataCollator
    from tests.helpers import make_processor, make_tokenizer

    imported = time.time()
    collator = MagmaDataCollator(make_processor(make_tokenizer(), image_size=384))
    load = [os.getloadavg()[0]]
    sampler = TreeSampler().start()

    def loader(dataset, workers: int):
        if path == "streamed":
            dataset.check_readers(workers)
            return StatefulDataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collator)
        generator = torch.Generator().manual_seed(0)
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=collator, generator=generator
        )

    def check(batch) -> int:
        assert batch["pixel_values"].shape[1:] == (3, 384, 384), batch["pixel_values"].shape
        return batch["pixel_values"].shape[0]

    rss_before = _proc_fields(os.getpid(), "status", ("VmRSS",))["VmRSS"] * 1024  # imports, tokenizer, processor
    start, cpu_start = time.perf_counter(), time.process_time()
    dataset = build_stream(folder) if path == "streamed" else load_image_caption_dataset(folder)
    built = time.perf_counter()
    iterator = iter(loader(dataset, 1))
    check(next(iterator))
    first = time.perf_counter()
    first_cpu = time.process_time() - cpu_start + sampler.worker_cpu()  # main process + worker
    if first_only:
        sampler.sample()
        sampler.stop()
        result = {
            "time_to_first_batch_s": first - start,
            "first_batch_cpu_s": first_cpu,
            "peak_rss_main": _proc_fields(os.getpid(), "status", ("VmHWM",))["VmHWM"] * 1024,
            "peak_pss_all": sampler.peak_pss,
            "load_average_1min": load + [os.getloadavg()[0]],
        }
        Path(result_file).write_text(json.dumps(result))
        return
    cpu_first = sampler.worker_cpu()
    samples = sum(check(next(iterator)) for _ in range(batches))
    end = time.perf_counter()
    cpu_end = sampler.worker_cpu()
    sampler.sample()
    one = {
        "time_to_first_batch_s": first - start,
        "first_batch_cpu_s": first_cpu,
        "build_s": built - start,
        "samples_per_s_per_worker": samples / (end - first),
        "samples_per_worker_cpu_s": samples / max(cpu_end - cpu_first, 1e-9),
        "worker_cpu_share": (cpu_end - cpu_first) / (end - first),
        "rss_main_before": rss_before,
        "peak_rss_main": _proc_fields(os.getpid(), "status", ("VmHWM",))["VmHWM"] * 1024,
        "peak_pss_all": sampler.peak_pss,
        "peak_rss_all": sampler.peak_rss,
        "peak_rss_worker": max((v["hwm"] for pid, v in sampler.seen.items() if pid != os.getpid()), default=0),
        "peak_anon_rss": dict(sampler.peak_anon),
    }
    load.append(os.getloadavg()[0])
    del iterator

    iterator = iter(loader(dataset, 2))
    check(next(iterator))  # the workers' start, not timed
    two_first = time.perf_counter()
    samples = sum(check(next(iterator)) for _ in range(batches))
    two = {"samples_per_s": samples / (time.perf_counter() - two_first)}
    sampler.sample()
    del iterator
    sampler.stop()
    load.append(os.getloadavg()[0])
    result = {
        "path": path,
        "rows": len(dataset) if path == "map-style" else None,
        "import_s": imported - started_process,
        "one_worker": one,
        "two_workers": two,
        "write_bytes_proc": sum(v.get("write_bytes", 0) for v in sampler.seen.values()),
        "peak_pss_all_with_2_workers": sampler.peak_pss,
        "load_average_1min": load,
    }
    Path(result_file).write_text(json.dumps(result))


def run_child(path: str, folder: Path, size: int, args, scratch: Path, first_only: bool = False) -> dict:
    """One measurement in a fresh process with its own empty cache and temp folders; adds the bytes they hold after."""
    fresh = Path(tempfile.mkdtemp(prefix=f"{path}-{size}-", dir=scratch))
    homes = {"HF_HOME": fresh / "hf_home", "HF_DATASETS_CACHE": fresh / "hf_datasets", "TMPDIR": fresh / "tmp",
             "XDG_CACHE_HOME": fresh / "xdg_cache"}  # fmt: skip
    for folder_ in homes.values():
        folder_.mkdir()
    env = {**os.environ, **{k: str(v) for k, v in homes.items()}, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    before = snapshot(folder)
    result_file = fresh / "result.json"
    command = [sys.executable, "-m", __spec__.name, "--child", path, "--folder", str(folder),
               "--result", str(result_file), "--batch-size", str(args.batch_size),
               "--batches", str(args.batches)]  # fmt: skip
    command += ["--first-only"] if first_only else []
    started = time.perf_counter()
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        print(completed.stdout[-3000:], completed.stderr[-5000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"The {path} measurement at {size} samples failed (exit {completed.returncode})")
    result = json.loads(result_file.read_text())
    result_file.unlink()
    result.update(
        size=size,
        process_wall_s=time.perf_counter() - started,
        bytes_written=sum(folder_bytes(f) for f in homes.values()),
        bytes_written_by_folder={k: folder_bytes(v) for k, v in homes.items()},
        shards_unchanged=snapshot(folder) == before,
        shard_bytes=folder_bytes(folder),
    )
    if not args.keep_caches:
        import shutil

        shutil.rmtree(fresh)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# What one GPU consumes


def training_flops(caption_tokens: int) -> dict:
    """FLOPs of one MAGMA_v1 training sample, counted on the full-size model on the meta device: the image encoder's
    forward, the language model's forward (adapters and LM head included) and the backward (with the training policy:
    GPT-J frozen, so its weights get no gradients; adapters, projection and image encoder trained)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from magma_hf import MagmaConfig, MagmaForConditionalGeneration

    config = MagmaConfig()  # MAGMA_v1: GPT-J-6B, RN50x16 at 384 px, MLP adapters with downsample factor 4
    with torch.device("meta"):
        model = MagmaForConditionalGeneration(config)
        pixel_values = torch.zeros(1, 3, config.vision_config.image_size, config.vision_config.image_size)
        caption_ids = torch.zeros(1, caption_tokens, dtype=torch.long)
    model.apply_training_policy()
    model.train()
    image_tokens = config.num_image_tokens
    labels = torch.cat([torch.full((1, image_tokens), -100, device="meta"), caption_ids], 1)
    with FlopCounterMode(display=False) as counter:
        image_embeddings = model.get_image_features(pixel_values).pooler_output
    image_forward = counter.get_total_flops()
    inputs_embeds = torch.cat([image_embeddings, model.get_input_embeddings()(caption_ids)], 1)
    with FlopCounterMode(display=False) as counter:
        loss = model(inputs_embeds=inputs_embeds, labels=labels).loss
    lm_forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    backward = counter.get_total_flops()
    text = config.text_config
    return {
        "image_tokens": image_tokens,
        "caption_tokens": caption_tokens,
        "sequence": image_tokens + caption_tokens,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "gptj": {"n_layer": text.n_layer, "n_embd": text.n_embd, "vocab_size": text.vocab_size},
        "image_forward": image_forward,
        "lm_forward": lm_forward,
        "backward": backward,
        "per_sample": image_forward + lm_forward + backward,
        # gradient checkpointing (train_magma_v1.yml) runs the GPT-J blocks' forward again in the backward
        "per_sample_with_recompute": image_forward + 2 * lm_forward + backward,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Report


def mib(value: float) -> str:
    return f"{value / 2**20:.0f} MiB"


def megabytes(value: float) -> str:
    if value < 1e6:
        return f"{value / 1e3:.0f} kB" if value else "0 B"
    return f"{value / 1e6:.1f} MB"


def first_batch_times(result: dict, key: str = "time_to_first_batch_s") -> list[float]:
    return [result["one_worker"][key]] + [r[key] for r in result["repeats"]]


def print_table(results: list[dict]) -> None:
    header = ("path", "samples", "first batch (median, min-max)", "first batch CPU (main + worker)",
              "peak RSS main (over imports)", "peak RSS worker", "written to cache/tmp", "kernel write_bytes",
              "shards unchanged", "samples/s/worker", "samples/worker-CPU-s", "2 workers: samples/s",
              "load 1 min")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in results:
        one = r["one_worker"]
        times = sorted(first_batch_times(r))
        spread = f" ({times[0]:.2f}-{times[-1]:.2f})" if len(times) > 1 else ""
        cpu = statistics.median(first_batch_times(r, "first_batch_cpu_s"))
        cells = (r["path"], f"{r['size']:,}", f"{statistics.median(times):.2f} s{spread}", f"{cpu:.2f} s",
                 f"{mib(one['peak_rss_main'])} (+{mib(one['peak_rss_main'] - one['rss_main_before'])})",
                 mib(one["peak_rss_worker"]), megabytes(r["bytes_written"]), megabytes(r["write_bytes_proc"]),
                 "yes" if r["shards_unchanged"] else "NO", f"{one['samples_per_s_per_worker']:.1f}",
                 f"{one['samples_per_worker_cpu_s']:.1f}", f"{r['two_workers']['samples_per_s']:.1f}",
                 " / ".join(f"{x:.1f}" for x in r["load_average_1min"]))  # fmt: skip
        print("| " + " | ".join(cells) + " |")


def print_goals(results: list[dict]) -> None:
    """The streamed path's goals: time to the first batch and memory within 1.5x across the sizes, no bytes written."""
    streamed = sorted((r for r in results if r["path"] == "streamed"), key=lambda r: r["size"])
    if len(streamed) < 2:
        return
    small, large = streamed[0], streamed[-1]
    ratios = {
        "first batch": statistics.median(first_batch_times(large)) / statistics.median(first_batch_times(small)),
        "first batch CPU": statistics.median(first_batch_times(large, "first_batch_cpu_s"))
        / statistics.median(first_batch_times(small, "first_batch_cpu_s")),
        "peak RSS main": large["one_worker"]["peak_rss_main"] / small["one_worker"]["peak_rss_main"],
        "peak RSS worker": large["one_worker"]["peak_rss_worker"] / small["one_worker"]["peak_rss_worker"],
    }
    written = max(r["bytes_written"] for r in streamed)
    unchanged = all(r["shards_unchanged"] for r in streamed)
    met = all(ratio <= 1.5 for ratio in ratios.values()) and written == 0 and unchanged
    print(f"Streamed, {large['size']:,} against {small['size']:,} samples: "
          + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in ratios.items())
          + f"; {written} bytes written to the cache/temp folders; shards {'unchanged' if unchanged else 'CHANGED'}: "
          f"goals (within 1.5x, zero bytes) {'met' if met else 'NOT met'}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4000, 40000], help="samples per dataset")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "magma-bench-data",
                        help="where the shards are made (reused when present) and the caches go")  # fmt: skip
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--pool", type=int, default=200, help="distinct JPEGs the shards reuse")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=50, help="batches timed after the first")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="fresh processes measuring the time to the first batch of the streamed path (the median "
        "is reported: a loaded machine makes single figures noisy)",
    )
    parser.add_argument("--map-repeats", type=int, default=1, help="the same for the map-style path")
    parser.add_argument("--skip-map-large", action="store_true", help="map-style at the smallest size only")
    parser.add_argument("--keep-caches", action="store_true", help="keep what each measurement wrote")
    parser.add_argument("--caption-tokens", type=int, default=30, help="caption tokens per sample (eos included)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM bf16 dense peak")
    parser.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation assumed")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--first-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(args.child, args.folder, args.batch_size, args.batches, args.result, args.first_only)
        return

    load_start = os.getloadavg()
    print(f"Load average at the start: {' '.join(f'{x:.2f}' for x in load_start)} ({os.cpu_count()} cores)")
    folders = prepare_data(args.workdir, sorted(args.sizes), args.per_shard, args.pool)
    scratch = args.workdir / "runs"
    scratch.mkdir(exist_ok=True)
    results = []
    for size in sorted(args.sizes):
        for path in args.paths:
            if path == "map-style" and args.skip_map_large and size != min(args.sizes):
                continue
            print(f"Measuring {path} at {size:,} samples ...", flush=True)
            results.append(run_child(path, folders[size], size, args, scratch))
            repeats = args.repeats if path == "streamed" else args.map_repeats
            results[-1]["repeats"] = [
                run_child(path, folders[size], size, args, scratch, first_only=True) for _ in range(repeats - 1)
            ]
            one = results[-1]["one_worker"]
            times = " / ".join(f"{t:.2f}" for t in first_batch_times(results[-1]))
            print(f"  first batch {times} s, {one['samples_per_s_per_worker']:.1f} samples/s/worker, process "
                  f"{results[-1]['process_wall_s']:.0f} s", flush=True)  # fmt: skip
    print()
    shard_mb = {r["size"]: r["shard_bytes"] / 1e6 for r in results}
    print(f"Shards: {', '.join(f'{size:,} samples = {mb:.0f} MB' for size, mb in sorted(shard_mb.items()))}; "
          f"batch {args.batch_size}, {args.batches} batches timed after the first")  # fmt: skip
    print_table(results)
    print_goals(results)

    flops = training_flops(args.caption_tokens)
    sustained = args.peak_tflops * 1e12 * args.mfu
    need = sustained / flops["per_sample"]
    need_peak = args.peak_tflops * 1e12 / flops["per_sample"]
    print()
    print(
        f"MAGMA_v1 training FLOPs per sample ({flops['image_tokens']} image + {flops['caption_tokens']} caption "
        f"tokens; FlopCounterMode on the full model on the meta device; GPT-J frozen: forward + input gradients):"
    )
    print(
        f"  image encoder forward {flops['image_forward'] / 1e9:.1f} GFLOP, language model forward "
        f"{flops['lm_forward'] / 1e9:.1f} GFLOP, backward {flops['backward'] / 1e9:.1f} GFLOP: "
        f"{flops['per_sample'] / 1e12:.3f} TFLOP per sample ({flops['per_sample_with_recompute'] / 1e12:.3f} with "
        "gradient checkpointing's recomputed forward, not counted in MFU)"
    )
    print(f"  one H100 SXM at {args.peak_tflops:.0f} TFLOP/s bf16 dense x {args.mfu:.0%} MFU: {need:.1f} samples/s "
          f"({need_peak:.1f} samples/s at 100% of peak)")  # fmt: skip
    workers = {}
    for r in results:
        if r["path"] == "streamed":
            rate = r["one_worker"]["samples_per_s_per_worker"]
            cpu_rate = r["one_worker"]["samples_per_worker_cpu_s"]
            workers[r["size"]] = {"per_wall_s": math.ceil(need / rate), "per_cpu_s": math.ceil(need / cpu_rate),
                                  "at_peak_per_cpu_s": math.ceil(need_peak / cpu_rate)}  # fmt: skip
            print(f"  streamed, {r['size']:,} samples: {rate:.1f} samples/s per worker here ({cpu_rate:.1f} per "
                  f"worker CPU second) -> {math.ceil(need / rate)} workers at this machine's measured rate, "
                  f"{math.ceil(need / cpu_rate)} with a core per worker ({math.ceil(need_peak / cpu_rate)} at 100% "
                  "of peak)")  # fmt: skip

    if args.json:
        figures = {"load_average_start": load_start, "load_average_end": os.getloadavg(), "cores": os.cpu_count(),
                   "batch_size": args.batch_size, "batches": args.batches, "results": results, "flops": flops,
                   "peak_tflops": args.peak_tflops, "mfu": args.mfu, "gpu_samples_per_s": need,
                   "gpu_samples_per_s_at_peak": need_peak, "workers_needed": workers}  # fmt: skip
        args.json.write_text(json.dumps(figures, indent=2))
        print(f"\nWrote {args.json}")


if __name__ == "__main__":
    main()
