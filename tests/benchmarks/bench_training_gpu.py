"""MAGMA_v1 training at full size on one GPU: bf16, DeepSpeed ZeRO-2, gradient checkpointing (the shipped
configuration/train_magma_v1.yml on one GPU: 256 samples per optimizer step = micro-batch 32 x 8 accumulation steps).
Prints the seconds per optimizer step, samples/s, and peak GPU memory.

GPT-J-6B + CLIP RN50x16 at 384 px with MLP adapters (downsample 4), random weights (no download: the numbers do not
depend on the values), built directly on the GPU in bf16. Data: random 384 px images with captions, preprocessed by
MagmaDataCollator in dataloader workers, as in training.

    python -m tests.benchmarks.bench_training_gpu                      # full size, needs a GPU
    python -m tests.benchmarks.bench_training_gpu --micro-batch 16 --grad-accum 16
    python -m tests.benchmarks.bench_training_gpu --tiny               # the same code path on CPU with the tiny model

`--tiny` runs the CPU-side parts (the tiny config, fp32, DeepSpeed ZeRO-2 on CPU) to check the script itself. If the
full size runs out of GPU memory, halve --micro-batch and double --grad-accum (the same 256 samples per step).
"""

import argparse
import time

import torch


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype, image_token_id: int, eos: int):
    from magma_hf import MagmaConfig, MagmaForConditionalGeneration

    special = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
    if tiny:
        config = MagmaConfig(
            text_config={"n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8, "n_positions": 128,
                         "vocab_size": 328, **special},
            vision_config={"layers": [1, 1, 1, 1], "width": 8, "image_size": 64},
            image_token_id=image_token_id,
        )  # fmt: skip
    else:
        # MagmaConfig's defaults are MAGMA_v1: GPT-J-6B, RN50x16 at 384, MLP adapters with downsample factor 4.
        config = MagmaConfig(text_config=special, image_token_id=image_token_id)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = MagmaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default_dtype)
    return model


class StepTimer:
    """Wall time of the optimizer steps after `warmup` (CUDA synchronized)."""

    def __init__(self, warmup: int, cuda: bool):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == warmup and timer.start is None:
                    timer.sync()
                    timer.start = time.perf_counter()

            def on_train_end(self, args, state, control, **kwargs):
                timer.sync()
                timer.end = time.perf_counter()

        self.cuda = cuda
        self.start = self.end = None
        self.callback = Callback()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny config on CPU (checks the script)")
    parser.add_argument("--micro-batch", type=int, default=None, help="per-device batch (default 32; tiny 4)")
    parser.add_argument("--grad-accum", type=int, default=None, help="accumulation steps (default 8; tiny 2)")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    parser.add_argument("--zero-stage", type=int, default=2, choices=[1, 2, 3])
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--workers", type=int, default=None, help="dataloader workers (default 8; tiny 0)")
    args = parser.parse_args()

    from transformers import TrainingArguments

    from magma_hf import MagmaImageProcessor, MagmaProcessor
    from magma_hf.training.collator import MagmaDataCollator
    from magma_hf.training.deepspeed import deepspeed_config, single_process_distributed_env
    from magma_hf.training.trainer import MagmaLRSchedule, MagmaTrainer
    from tests.helpers import CORPUS, make_tokenizer, random_image

    cuda = not args.tiny
    if cuda and not torch.cuda.is_available():
        raise SystemExit("No GPU: run with --tiny to check the script on CPU")
    micro = args.micro_batch or (4 if args.tiny else 32)
    accumulation = args.grad_accum or (2 if args.tiny else 8)
    workers = args.workers if args.workers is not None else (0 if args.tiny else 8)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32

    single_process_distributed_env()  # DeepSpeed in one plain process
    # The tokenizer: the tests' byte-level BPE (no download); captions take ~3x the tokens GPT-2's would.
    tokenizer = make_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<|image|>")
    start = time.perf_counter()
    model = build_model(args.tiny, device, dtype, image_token_id, tokenizer.eos_token_id)
    build_seconds = time.perf_counter() - start
    size = model.config.vision_config.image_size
    processor = MagmaProcessor(image_processor=MagmaImageProcessor(image_size=size), tokenizer=tokenizer)
    n_samples = micro * accumulation * (args.warmup + args.steps)
    rows = [
        {"image": random_image(k % 64, size=(size + 32, size)), "captions": [CORPUS[k % 5]]} for k in range(n_samples)
    ]

    training_args = TrainingArguments(
        output_dir="/tmp/bench_training_gpu",
        max_steps=args.warmup + args.steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        learning_rate=8e-4,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        bf16=cuda,
        use_cpu=not cuda,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        deepspeed=deepspeed_config(args.zero_stage),
        dataloader_num_workers=workers,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    timer = StepTimer(args.warmup, cuda)
    trainer = MagmaTrainer(
        model=model,
        args=training_args,
        train_dataset=rows,
        processing_class=processor,
        data_collator=MagmaDataCollator(processor, max_length=model.config.text_config.n_positions),
        image_enc_lr=2e-6,
        lr_schedule=MagmaLRSchedule(min_lr=0.0, warmup_num_steps=100, lr_decay_iters=300000),
        callbacks=[timer.callback],
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    seconds = (timer.end - timer.start) / args.steps
    batch = micro * accumulation
    sample = MagmaDataCollator(processor)([rows[0]])
    print(
        f"device: {torch.cuda.get_device_name() if cuda else 'CPU'}; torch {torch.__version__}; DeepSpeed ZeRO-"
        f"{args.zero_stage}; {'bf16' if cuda else 'fp32'}; gradient checkpointing {not args.no_gradient_checkpointing}"
    )
    print(
        f"model: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable; built in {build_seconds:.1f} s"
    )
    print(
        f"batch: {batch} samples per optimizer step (micro-batch {micro} x {accumulation}), sequence length "
        f"~{sample['input_ids'].shape[1]} ({model.config.num_image_tokens} image tokens)"
    )
    print(
        f"optimizer step: {seconds:.2f} s ({batch / seconds:.1f} samples/s), mean of {args.steps} after {args.warmup}"
    )
    if cuda:
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated, "
              f"{torch.cuda.max_memory_reserved() / 2**30:.1f} GiB reserved")  # fmt: skip


if __name__ == "__main__":
    main()
