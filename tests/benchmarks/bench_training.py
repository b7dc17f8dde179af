"""Training throughput and peak memory of MagmaTrainer on CPU, for the tiny test config and a small config, without
and with gradient checkpointing.

Each config and checkpointing setting runs in its own process (so that peak memory is its own): MagmaTrainer with
MagmaDataCollator on in-memory random images and real captions, fp32, AdamW, the original's schedule; `--warmup`
steps untimed, then `--steps` timed optimizer steps. Checkpointing: `none`; `gptj`, GPT-J's blocks only (all it
covered before it covered the image encoder); `all`, GPT-J's blocks and the image encoder's residual blocks
(`activation_checkpointing_enable()`). Prints samples/s, seconds per step, the process's peak resident memory, the
peak tensor memory of one training step (forward and backward, from torch.profiler's allocation records: what
checkpointing saves, which the resident memory of a small model hides), and, for scale, the parameter counts of
MAGMA_v1 at full size (built on the meta device) and the size of its adapter export.

    python -m tests.benchmarks.bench_training [--configs tiny small] [--checkpointing none gptj all] [--steps 5]
        [--warmup 2] [--threads N]
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

CONFIGS = {
    # 2 GPT-J blocks of 64, a [1,1,1,1] ResNet of width 8 at 64 px: 4 image tokens (configuration/train_tiny_cpu.yml)
    "tiny": {
        "text_config": {"n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8, "n_positions": 128},
        "vision_config": {"layers": [1, 1, 1, 1], "width": 8, "image_size": 64},
        "batch_size": 4,
    },
    # 8 GPT-J blocks of 512 with GPT-J's 50400-token vocabulary, a [2,2,2,2] ResNet of width 32 at 224 px: 49 image
    # tokens of 1024 features
    "small": {
        "text_config": {"n_embd": 512, "n_layer": 8, "n_head": 8, "rotary_dim": 32, "n_positions": 256,
                        "vocab_size": 50400},
        "vision_config": {"layers": [2, 2, 2, 2], "width": 32, "image_size": 224},
        "batch_size": 8,
    },
}  # fmt: skip


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


CHECKPOINTING = ("none", "gptj", "all")


def step_peak_mib(model, batch: dict) -> float:
    """Peak of the tensor memory allocated, and not yet freed, during one forward and backward pass: the allocations
    and frees torch.profiler records, summed in the order their operations started (MiB above the memory before)."""
    from torch.profiler import ProfilerActivity, profile

    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        model(**batch).loss.backward()
    live = peak = 0
    for event in sorted(profiler.events(), key=lambda event: event.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def run_one(name: str, steps: int, warmup: int, checkpointing: str = "none") -> dict:
    from transformers import TrainerCallback, TrainingArguments

    from magma_hf import MagmaConfig, MagmaForConditionalGeneration, MagmaImageProcessor, MagmaProcessor
    from magma_hf.training.trainer import MagmaLRSchedule, MagmaTrainer
    from tests.helpers import CORPUS, make_tokenizer, random_image

    spec = CONFIGS[name]
    tokenizer = make_tokenizer()
    eos = tokenizer.eos_token_id
    text_config = {"vocab_size": len(tokenizer) + 6, "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
    text_config.update(spec["text_config"])
    config = MagmaConfig(
        text_config=text_config,
        vision_config=spec["vision_config"],
        adapter_config={"mlp": {"adapter_type": "normal", "downsample_factor": 4}},
        image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"),
    )
    torch.manual_seed(0)
    model = MagmaForConditionalGeneration(config)
    if checkpointing != "none":
        model.activation_checkpointing_enable()
        model.vision_tower.gradient_checkpointing = checkpointing == "all"
    size = spec["vision_config"]["image_size"]
    processor = MagmaProcessor(image_processor=MagmaImageProcessor(image_size=size), tokenizer=tokenizer)
    rows = [{"image": random_image(k, size=(size + 16, size)), "captions": [CORPUS[k % 5]]} for k in range(64)]
    rss_after_build = peak_rss_mib()

    class Timer(TrainerCallback):
        start = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                self.start = time.perf_counter()

    timer = Timer()
    args = TrainingArguments(
        output_dir="/tmp/bench_training_unused",
        max_steps=warmup + steps,
        per_device_train_batch_size=spec["batch_size"],
        learning_rate=1e-4,
        use_cpu=True,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        logging_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = MagmaTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        processing_class=processor,
        lr_schedule=MagmaLRSchedule(warmup_num_steps=2),
        callbacks=[timer],
    )
    trainer.train()
    elapsed = time.perf_counter() - timer.start
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    step_peak = min(step_peak_mib(model, batch) for _ in range(2))  # the first step after training may allocate more
    return {
        "config": name,
        "checkpointing": checkpointing,
        "batch": spec["batch_size"],
        "image_tokens": config.num_image_tokens,
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "samples_per_s": spec["batch_size"] * steps / elapsed,
        "s_per_step": elapsed / steps,
        "peak_rss_mib": peak_rss_mib(),
        "rss_after_build_mib": rss_after_build,
        "step_peak_mib": step_peak,
    }


def magma_v1_sizes() -> dict:
    """Parameter counts of MAGMA_v1 at full size, on the meta device (no memory, no weights)."""
    from magma_hf import MagmaConfig, MagmaForConditionalGeneration
    from magma_hf.weights_magma import PROJECTOR_PREFIX, VISION_TOWER_PREFIX, is_adapter_weight, magma_state_dict

    with torch.device("meta"):
        model = MagmaForConditionalGeneration(MagmaConfig())
    state = model.state_dict()
    own = magma_state_dict(state)
    gptj = sum(t.numel() for n, t in state.items() if n not in own)
    adapters = sum(t.numel() for n, t in own.items() if is_adapter_weight(n))
    encoder = sum(t.numel() for n, t in own.items() if n.startswith(VISION_TOWER_PREFIX))
    projection = sum(t.numel() for n, t in own.items() if n.startswith(PROJECTOR_PREFIX))
    return {"gptj": gptj, "adapters": adapters, "image_encoder": encoder, "projection": projection}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--checkpointing", nargs="+", default=list(CHECKPOINTING), choices=CHECKPOINTING)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_one(args.child, args.steps, args.warmup, args.checkpointing[0])))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, fp32")
    print(f"{'config':<7}{'ckpt':>5}{'batch':>6}{'img tok':>8}{'params':>12}{'trainable':>12}{'samples/s':>11}"
          f"{'s/step':>9}{'peak RSS MiB':>14}{'after build':>13}{'step peak MiB':>15}")  # fmt: skip
    for name in args.configs:
        for checkpointing in args.checkpointing:
            command = [sys.executable, "-m", __spec__.name, "--child", name, "--checkpointing", checkpointing]
            command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
            if args.threads:
                command += ["--threads", str(args.threads)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            r = json.loads(output.strip().splitlines()[-1])
            print(f"{r['config']:<7}{r['checkpointing']:>5}{r['batch']:>6}{r['image_tokens']:>8}"
                  f"{r['params_total']:>12,}{r['params_trainable']:>12,}{r['samples_per_s']:>11.2f}"
                  f"{r['s_per_step']:>9.3f}{r['peak_rss_mib']:>14.0f}{r['rss_after_build_mib']:>13.0f}"
                  f"{r['step_peak_mib']:>15.2f}")  # fmt: skip

    sizes = magma_v1_sizes()
    own = sizes["adapters"] + sizes["image_encoder"] + sizes["projection"]
    print("\nMAGMA_v1 at full size (meta device): " + ", ".join(f"{k} {v:,}" for k, v in sizes.items()))
    print(f"adapter export (adapters + image encoder + projection): {own:,} parameters = {own * 2 / 2**30:.2f} GiB in "
          f"bf16, vs GPT-J {sizes['gptj'] * 2 / 2**30:.2f} GiB")  # fmt: skip


if __name__ == "__main__":
    main()
