"""Sharded evaluation: `magma-hf eval` over 2 processes (`accelerate launch`) against 1 process, wall time.

A small MAGMA (GPT-J 8x512 with GPT-J's 50400-token vocabulary, a [2,2,2,2] ResNet of width 32 at 224 px: 49 image
tokens; random weights) and a VQA set in the original layout made here (`--questions` questions on `--images` random
images, ten answers each). Each run is the whole command, process start-up and model loading included:

- 1 process, torch's default threads (all cores);
- 1 process, 1 thread (for scale: the share of one core);
- 2 processes under `accelerate launch --multi_gpu --num_processes 2` (gloo on the CPU; torchrun gives each 1 thread).

The answers and the accuracy of the runs are checked equal. Prints the wall times and the ratios.

    python -m tests.benchmarks.bench_sharded_eval [--questions 240] [--images 60] [--batch-size 8]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from magma_hf import MagmaConfig, MagmaForConditionalGeneration
from tests.helpers import accelerate_launch, make_processor, make_tokenizer, random_image

QUESTIONS = ["What is in the picture?", "Is it red?", "How many dogs?", "Is it night?", "What are they riding?"]


def make_model(folder: Path) -> None:
    tokenizer = make_tokenizer()
    eos = tokenizer.eos_token_id
    config = MagmaConfig(
        text_config={"n_embd": 512, "n_layer": 8, "n_head": 8, "rotary_dim": 32, "n_positions": 256,
                     "vocab_size": 50400, "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos},
        vision_config={"layers": [2, 2, 2, 2], "width": 32, "image_size": 224},
        adapter_config={"mlp": {"adapter_type": "normal", "downsample_factor": 4}},
        image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"),
    )  # fmt: skip
    torch.manual_seed(0)
    MagmaForConditionalGeneration(config).save_pretrained(folder)
    make_processor(tokenizer, image_size=224).save_pretrained(folder)


def make_data(folder: Path, questions: int, images: int) -> None:
    (folder / "images" / "0").mkdir(parents=True)
    (folder / "image_data" / "0").mkdir(parents=True)
    for n in range(images):
        random_image(n, size=(256, 224)).save(folder / "images" / "0" / f"{n}.png")
    for n in range(questions):
        question = QUESTIONS[n % len(QUESTIONS)]
        sample = {
            "image_path": f"images/0/{n % images}.png",
            "captions": [f"Q: {question} A: yes"],
            "metadata": {"question": question, "answers": ["yes"] * 7 + ["no"] * 3, "question_id": n},
        }
        (folder / "image_data" / "0" / f"{n:05d}.json").write_text(json.dumps(sample))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=240)
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_model(root / "model")
        make_data(root / "vqa", args.questions, args.images)

        def eval_args(name: str) -> list[str]:
            return ["-m", "magma_hf", "eval", "--task", "vqa", "--data", str(root / "vqa"), "--model",
                    str(root / "model"), "--batch-size", str(args.batch_size), "--max-new-tokens",
                    str(args.max_new_tokens), "--output", str(root / f"{name}.json"), "--no-progress"]  # fmt: skip

        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        repository = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [repository, env.get("PYTHONPATH")]))

        def one_process(name: str, **extra_env):
            return subprocess.run([sys.executable, *eval_args(name)], env=dict(env, **extra_env), capture_output=True,
                                  text=True)  # fmt: skip

        runs = {}
        print(f"load average before: {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs", flush=True)
        for name, launch in (
            ("1 process", lambda: one_process("one")),
            ("1 process, 1 thread", lambda: one_process("one-thread", OMP_NUM_THREADS="1")),
            ("2 processes", lambda: accelerate_launch(eval_args("two"), cwd=root, timeout=3600)),
        ):  # fmt: skip
            start = time.perf_counter()
            completed = launch()
            runs[name] = time.perf_counter() - start
            if completed.returncode != 0:
                raise SystemExit(f"{name} failed:\n{completed.stdout[-2000:]}\n{completed.stderr[-3000:]}")
            print(f"{name}: {runs[name]:.1f} s (load average now {os.getloadavg()[0]:.2f})", flush=True)

        results = {name: json.loads((root / f"{name}.json").read_text()) for name in ("one", "one-thread", "two")}
        answers = {
            name: [(r["id"], r["answer"], r["score"]) for r in result["examples"]] for name, result in results.items()
        }
        assert answers["one"] == answers["two"] == answers["one-thread"], "the runs answered differently"
        assert results["one"]["metrics"] == results["two"]["metrics"]
        accuracy = results["two"]["metrics"]["accuracy"]
        print(f"{args.questions} questions on {args.images} images, batch {args.batch_size}, "
              f"{args.max_new_tokens} new tokens; answers and accuracy ({accuracy:.2f}) equal")  # fmt: skip
        print(f"2 processes / 1 process: {runs['2 processes'] / runs['1 process']:.2f}; "
              f"2 processes / 1 process with 1 thread: {runs['2 processes'] / runs['1 process, 1 thread']:.2f}")


if __name__ == "__main__":
    main()
