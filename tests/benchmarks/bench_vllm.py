"""vLLM against transformers' `generate` on the CPU: 64 image prompts x 32 new tokens, greedy, on a small random MAGMA
(GPT-J 8 x 512, vocabulary 50400, ResNet [1, 1, 1, 1] of width 32 at 224 px: 49 image tokens), float32.

Run with vLLM's python (`.venv-vllm`); the transformers half runs in the model's environment, with
`--reference-python` (default: `MAGMA_HF_REFERENCE_PYTHON`, else `.venv/bin/python`):

    .venv-vllm/bin/python -m tests.benchmarks.bench_vllm [--workdir DIR] [--batch-sizes 1 8 16 32 64] [--runs N]

Prints tokens/s of `generate` at each batch size (every prompt left-padded in its batch), of vLLM (its own
scheduling; startup and one warm-up request not timed), and the ratio of vLLM to `generate` at its best batch size.
With `--runs N` the two alternate N times (`generate`'s sweep, then vLLM in a fresh process), each run with the load
average before it, and the medians over the runs are printed last. On the CPU, vLLM keeps one core for its front end
by default; `VLLM_CPU_NUM_OF_RESERVED_CPU=0` gives the model every core, as `generate` has them. The plugin sizes
vLLM's KV cache (the CPU backend's default reserves 92% of memory).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
N_PROMPTS = 64
NEW_TOKENS = 32
PROMPT = "Q: What is in the picture? A:"
TEXT_CONFIG = {"n_embd": 512, "n_layer": 8, "n_head": 16, "rotary_dim": 32, "vocab_size": 50400, "n_positions": 512}
VISION_CONFIG = {"layers": [1, 1, 1, 1], "width": 32, "image_size": 224}


def build_and_run_transformers(workdir: Path, batch_sizes: list[int]) -> dict:
    """The model's environment: a random folder and its images, then `generate`'s tokens/s per batch size."""
    import torch

    from tests.helpers import make_processor, make_tokenizer, random_image, save_tiny_magma, tiny_config

    torch.set_num_threads(os.cpu_count())
    tokenizer = make_tokenizer()
    processor = make_processor(tokenizer, image_size=VISION_CONFIG["image_size"])
    config = tiny_config(tokenizer, image_size=VISION_CONFIG["image_size"], text_config=TEXT_CONFIG,
                         vision_config=VISION_CONFIG)  # fmt: skip
    folder = workdir / "magma-small"
    model = save_tiny_magma(folder, tokenizer, processor, config=config)
    images = [random_image(n, size=(256, 256)) for n in range(N_PROMPTS)]
    for n, image in enumerate(images):
        image.save(workdir / f"image{n}.png")
    results = {}
    for batch_size in batch_sizes:
        start = time.perf_counter()
        with torch.inference_mode():
            for first in range(0, N_PROMPTS, batch_size):
                batch = images[first : first + batch_size]
                inputs = processor(images=[[image] for image in batch], text=[PROMPT] * len(batch),
                                   return_tensors="pt", padding=True)  # fmt: skip
                out = model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
                assert out.shape[1] - inputs["input_ids"].shape[1] == NEW_TOKENS
        seconds = time.perf_counter() - start
        results[batch_size] = N_PROMPTS * NEW_TOKENS / seconds
        print(f"generate, batch {batch_size}: {seconds:.1f} s, {results[batch_size]:.1f} tokens/s", file=sys.stderr)
    return {"folder": str(folder), "tokens_per_s": results}


def run_vllm(workdir: Path, folder: str, enforce_eager: bool) -> float:
    from PIL import Image
    from vllm import LLM, SamplingParams

    images = [Image.open(workdir / f"image{n}.png").convert("RGB") for n in range(N_PROMPTS)]
    llm = LLM(model=folder, dtype="float32", max_model_len=512, max_num_seqs=N_PROMPTS, enforce_eager=enforce_eager,
              limit_mm_per_prompt={"image": 1})  # fmt: skip
    # exactly NEW_TOKENS each, as generate's min/max; ids beyond the tiny tokenizer are not decoded
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, ignore_eos=True,
                            detokenize=False)  # fmt: skip
    requests = [{"prompt": PROMPT, "multi_modal_data": {"image": [image]}} for image in images]
    llm.generate(requests[:2], params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    assert all(len(output.outputs[0].token_ids) == NEW_TOKENS for output in outputs)
    print(f"vLLM: {seconds:.1f} s", file=sys.stderr)
    return N_PROMPTS * NEW_TOKENS / seconds


def one_run(args) -> dict:
    """`generate`'s sweep in the model's environment, then vLLM in a fresh process of this one."""
    load = os.getloadavg()[0]
    command = [args.reference_python, __file__, "--transformers-only", "--workdir", str(args.workdir),
               "--batch-sizes", *map(str, args.batch_sizes)]  # fmt: skip
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    reference = json.loads(result.stdout.strip().splitlines()[-1])
    generate = {int(size): rate for size, rate in reference["tokens_per_s"].items()}
    command = [sys.executable, __file__, "--vllm-only", reference["folder"], "--workdir", str(args.workdir)]
    command += ["--enforce-eager"] if args.enforce_eager else []
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    # vLLM logs to stdout too, its shutdown after the result
    (line,) = [line for line in result.stdout.splitlines() if line.startswith('{"tokens_per_s":')]
    vllm_rate = json.loads(line)["tokens_per_s"]
    best = max(generate, key=generate.get)
    return {"load": load, "generate": generate, "vllm": vllm_rate, "best": best, "ratio": vllm_rate / generate[best]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("bench-vllm"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    parser.add_argument("--runs", type=int, default=1, help="alternate generate and vLLM this many times; medians")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile")
    parser.add_argument("--reference-python", default=os.environ.get("MAGMA_HF_REFERENCE_PYTHON",
                                                                     str(REPO / ".venv/bin/python")))  # fmt: skip
    parser.add_argument("--transformers-only", action="store_true", help=argparse.SUPPRESS)  # the reference side
    parser.add_argument("--vllm-only", metavar="FOLDER", help=argparse.SUPPRESS)  # one vLLM measurement
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.transformers_only:
        print(json.dumps(build_and_run_transformers(args.workdir, args.batch_sizes)))
        return
    if args.vllm_only:
        print(json.dumps({"tokens_per_s": run_vllm(args.workdir, args.vllm_only, args.enforce_eager)}))
        return
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}")
    print(f"{N_PROMPTS} image prompts x {NEW_TOKENS} new tokens, GPT-J 8x512, ResNet width 32 at 224 px, float32;"
          f" VLLM_CPU_NUM_OF_RESERVED_CPU={os.environ.get('VLLM_CPU_NUM_OF_RESERVED_CPU', 'unset')}")  # fmt: skip
    vllm_name = "vLLM (eager)" if args.enforce_eager else "vLLM"
    runs = []
    for number in range(1, args.runs + 1):
        run = one_run(args)
        runs.append(run)
        rates = " / ".join(f"{run['generate'][size]:.1f}" for size in sorted(run["generate"]))
        print(f"run {number}: load average {run['load']:.2f} before; generate {rates} tokens/s at batch "
              f"{'/'.join(map(str, sorted(run['generate'])))}; {vllm_name} {run['vllm']:.1f} tokens/s; "
              f"vLLM / generate at batch {run['best']}: {run['ratio']:.2f}", flush=True)  # fmt: skip
    median = statistics.median
    print(f"medians over {len(runs)} run(s), load average {median(run['load'] for run in runs):.2f} before"
          f" (range {min(run['load'] for run in runs):.2f} to {max(run['load'] for run in runs):.2f}):")  # fmt: skip
    for size in sorted(runs[0]["generate"]):
        print(f"  generate, batch {size:>2}: {median(run['generate'][size] for run in runs):8.1f} tokens/s")
    best_generate = [max(run["generate"].values()) for run in runs]
    print(f"  generate, best batch:   {median(best_generate):8.1f} tokens/s")
    print(f"  {vllm_name + ':':<24}{median(run['vllm'] for run in runs):8.1f} tokens/s")
    print(
        f"  vLLM / best generate, per run: median {median(run['ratio'] for run in runs):.2f}, "
        f"range {min(run['ratio'] for run in runs):.2f} to {max(run['ratio'] for run in runs):.2f}"
    )


if __name__ == "__main__":
    main()
