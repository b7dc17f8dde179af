"""`magma-hf demo`: train a small MAGMA on real images on a CPU, end to end, then caption with it.

Nothing can be downloaded from the Hub on a fresh offline machine, so the demo makes everything it needs, through the
code paths a user of this package takes:

1. an image-caption dataset from the handwritten digits scikit-learn ships (1797 real 8x8 scans, captioned "a
   handwritten seven"), written in the original MAGMA layout by `magma_hf.convert_dataset` and read back by
   `load_magma_dataset`, with a held-out split;
2. a small byte-level BPE tokenizer (GPT-2's special tokens `<|endoftext|>` and `<|image|>`) and a small GPT-J
   pretrained on text alone, as GPT-J was before MAGMA: fact sheets about numbers, which hold the captions;
3. MAGMA's training proper: `magma_hf.train` with a `MagmaTrainingConfig`, the path of `magma-hf train` (the
   config is written to `train_config.yml`). GPT-J is frozen; the adapters, image prefix and image encoder learn to
   caption the training images;
4. evaluation on the held-out images: exact-match caption accuracy (greedy), the same on blank images (the blind
   baseline), and a bitwise check that the language model's weights did not change;
5. the saved model folder, reloaded through `pipeline("image-to-text", ..., trust_remote_code=True)`, captions held-out
   images onto a contact sheet (PNG);
6. `metrics.json`, `predictions.jsonl` and a short table.

It also tests MAGMA's claim that the frozen language model's knowledge carries over to images: questions that only
text pretraining ever asked ("seven / Q: Is this number odd? A: yes") are asked about held-out images
("<image> Q: Is this number odd? A:"), a pairing MAGMA's training never shows.
"""

from __future__ import annotations

import argparse
import json
import logging as std_logging
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import yaml
from datasets import Dataset
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import (
    GPTJConfig,
    GPTJForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    default_data_collator,
    pipeline,
    set_seed,
)

from .app import demo_app_command
from .data import convert_dataset, load_magma_dataset
from .folders import sha256_of, write_text_atomically
from .generation import answer_text, generate_answers
from .processing_magma import add_magma_special_tokens
from .training.config import MagmaTrainingConfig
from .training.run import train
from .weights_magma import MODEL_WEIGHTS_FILE, gptj_name

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
EOS = "<|endoftext|>"
VOCAB_SIZE = 400  # the corpus has a few dozen words: every one of them becomes a token
LM_BLOCK_SIZE = 64  # tokens per pretraining sequence, and the language model's context
GENERATION = {"max_new_tokens": 8, "batch_size": 64}  # greedy answers and captions of a few words
MARKER = ".magma-demo"  # marks a folder this command wrote, so that a rerun may replace its outputs
MARKER_NOTE = "Written by `magma-hf demo`; a rerun replaces its outputs here, unless they changed since."
OUTPUTS = (
    "data", "language-model", "magma", "train_config.yml", "contact_sheet.png", "predictions.jsonl", "metrics.json"
)


# ---------------------------------------------------------------------------------------------------------------------
# Sizes


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is. `full` is `make demo`'s; `small` runs in well under a minute, for the tests."""

    digits_per_class: int | None  # images of each digit taken from the 1797 (about 180 each); None: all
    test_fraction: float  # held out, stratified by digit
    text_documents: int  # text pretraining documents
    lm_hidden: int
    lm_layers: int
    lm_heads: int
    lm_steps: int
    lm_batch_size: int
    lm_lr: float
    image_size: int  # a multiple of 32: (image_size / 32) ** 2 image tokens
    encoder_width: int
    adapter_downsample: int
    magma_steps: int
    magma_batch_size: int
    magma_lr: float
    sheet_images_per_digit: int  # held-out images captioned through the pipeline onto the contact sheet


SIZES = {
    "full": DemoSize(
        digits_per_class=None, test_fraction=0.2, text_documents=4000,
        lm_hidden=128, lm_layers=4, lm_heads=4, lm_steps=500, lm_batch_size=16, lm_lr=3e-3,
        image_size=64, encoder_width=16, adapter_downsample=4, magma_steps=250, magma_batch_size=32, magma_lr=2e-3,
        sheet_images_per_digit=4,
    )
}
SIZES["small"] = replace(
    SIZES["full"], digits_per_class=60, test_fraction=0.25, text_documents=1500, lm_hidden=64, lm_layers=2,
    lm_steps=200, encoder_width=8, magma_steps=200, magma_batch_size=16, magma_lr=3e-3, sheet_images_per_digit=1,
)


# ---------------------------------------------------------------------------------------------------------------------
# Text: captions, facts about numbers, and questions only the text corpus asks


def caption_for(digit: int) -> str:
    return f"a handwritten {NUMBER_WORDS[digit]}"


def number_facts(digit: int) -> list[str]:
    """What a text corpus could say about a number."""
    word = NUMBER_WORDS[digit]
    facts = [f"{word} is an {'odd' if digit % 2 else 'even'} number", f"{word} comes before {NUMBER_WORDS[digit + 1]}"]
    if digit > 0:
        facts.append(f"{word} comes after {NUMBER_WORDS[digit - 1]}")
    return facts


@dataclass(frozen=True)
class Question:
    """A question about "this number" that text pretraining asks, and MAGMA's training never does."""

    prompt: str
    answer: Callable[[int], str]


QUESTIONS = {
    "parity": Question("Q: Is this number odd? A:", lambda digit: "yes" if digit % 2 else "no"),
    "successor": Question("Q: Which number comes after it? A:", lambda digit: NUMBER_WORDS[digit + 1]),
}


def text_document(digit: int, rng: random.Random) -> str:
    """One pretraining document: a number's fact sheet. Its name as a heading, then some of its caption and facts in
    any order, and often a question about it:

    ```
    seven
    seven comes after six
    a handwritten seven
    Q: Is this number odd? A: yes
    ```

    Whether the fact a question needs is stated above it is left to chance, so the language model has to know the
    answers, not only read them off.
    """
    lines = [caption_for(digit), *number_facts(digit)]
    rng.shuffle(lines)
    lines = lines[: rng.randint(0, len(lines))]
    if rng.random() < 0.6 or not lines:
        question = rng.choice(list(QUESTIONS.values()))
        lines.append(f"{question.prompt} {question.answer(digit)}")
    return "\n".join([NUMBER_WORDS[digit], *lines])


def text_corpus(n_documents: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [text_document(rng.randrange(10), rng) for _ in range(n_documents)]


# ---------------------------------------------------------------------------------------------------------------------
# 1. The image-caption dataset


def digit_image(pixels: np.ndarray) -> Image.Image:
    """One of scikit-learn's 8x8 scans (ink 0-16) as a grayscale image, dark ink on white paper."""
    return Image.fromarray((255 - pixels * 255 / 16).round().astype(np.uint8))  # uint8 [8, 8]: mode "L"


def build_datasets(data_dir: Path, size: DemoSize, seed: int):
    """Write the digits in the original MAGMA layout (`data_dir/train`, `data_dir/test`) and read them back.

    Returns `(train, test)`: `datasets.Dataset`s with the MAGMA columns (`image`, `image_path`, `captions`,
    `metadata`); each sample's metadata holds its `digit` and its `index` in `load_digits()`.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise ImportError(
            "magma-hf demo takes its images from scikit-learn: pip install 'magma-hf[demo]' (or scikit-learn)"
        ) from error

    digits = load_digits()
    indices = np.arange(len(digits.target))
    if size.digits_per_class is not None:
        rng = np.random.default_rng(seed)
        indices = np.concatenate(
            [rng.permutation(np.flatnonzero(digits.target == d))[: size.digits_per_class] for d in range(10)]
        )
    train_indices, test_indices = train_test_split(
        indices, test_size=size.test_fraction, random_state=seed, stratify=digits.target[indices]
    )
    scans = data_dir / "scans"  # PNGs written here are moved into the dataset by convert_dataset
    scans.mkdir(parents=True, exist_ok=True)
    for split, split_indices in (("train", train_indices), ("test", test_indices)):
        samples = []
        for index in tqdm(sorted(split_indices), desc=f"Writing the {split} scans"):
            digit = int(digits.target[index])
            path = scans / f"digit-{index:04d}.png"
            digit_image(digits.images[index]).save(path)
            metadata = {"source": "sklearn.datasets.load_digits", "index": int(index), "digit": digit}
            samples.append((path, {"captions": [caption_for(digit)], "metadata": metadata}))
        convert_dataset(data_dir / split, samples, mode="mv")
    scans.rmdir()
    return load_magma_dataset(data_dir / "train"), load_magma_dataset(data_dir / "test")


# ---------------------------------------------------------------------------------------------------------------------
# 2. Tokenizer and text pretraining


def train_tokenizer(corpus: list[str]):
    """GPT-2's kind of tokenizer, trained on `corpus`: byte-level BPE, `<|endoftext|>` as bos/eos/pad and `<|image|>`
    added as a special token, as MAGMA added it to GPT-2's."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - 1,  # `<|image|>` comes on top
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    return add_magma_special_tokens(wrapped)


def pack_corpus(corpus: list[str], tokenizer, block_size: int) -> list[list[int]]:
    """GPT-style pretraining data: the documents, each ended by `<|endoftext|>`, one after the other, cut into blocks of
    `block_size` tokens (no padding, so every end-of-text is learned)."""
    ids = [token for text in corpus for token in tokenizer(text + EOS)["input_ids"]]
    return [ids[start : start + block_size] for start in range(0, len(ids) - block_size + 1, block_size)]


def pretrain_language_model(corpus: list[str], tokenizer, size: DemoSize, seed: int, output_dir: Path):
    """A small GPT-J trained on text alone with transformers' `Trainer`; saved with its tokenizer to `output_dir`."""
    eos = tokenizer.eos_token_id
    config = GPTJConfig(
        vocab_size=-(-len(tokenizer) // 8) * 8,  # padded, as GPT-J pads GPT-2's vocabulary
        n_positions=LM_BLOCK_SIZE,
        n_embd=size.lm_hidden,
        n_layer=size.lm_layers,
        n_head=size.lm_heads,
        rotary_dim=size.lm_hidden // size.lm_heads // 2,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = GPTJForCausalLM(config)
    blocks = pack_corpus(corpus, tokenizer, LM_BLOCK_SIZE)
    args = TrainingArguments(
        output_dir=str(output_dir), seed=seed, use_cpu=True, save_strategy="no", report_to="none", disable_tqdm=False,
        max_steps=size.lm_steps, per_device_train_batch_size=size.lm_batch_size, learning_rate=size.lm_lr,
        warmup_steps=size.lm_steps // 10, lr_scheduler_type="cosine", weight_decay=0.01,
        logging_steps=max(1, size.lm_steps // 5),
    )
    dataset = Dataset.from_dict({"input_ids": blocks, "labels": blocks})
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator).train()
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# 3. MAGMA training


def magma_training_config(size: DemoSize, seed: int, output_dir: Path) -> dict:
    """The demo's `magma-hf train` config, every key as a user would write it in YAML."""
    return {
        "batch_size": size.magma_batch_size,
        "train_steps": size.magma_steps,
        "lr": size.magma_lr,
        "image_enc_lr": size.magma_lr,
        "min_lr": size.magma_lr / 20,
        "warmup_num_steps": size.magma_steps // 10,
        "lr_decay_iters": size.magma_steps,
        "weight_decay": 0.01,
        "save": str(output_dir / "magma"),
        "save_every": size.magma_steps,
        "eval_every": size.magma_steps // 2,
        "eval_steps": 2,
        "log_every": max(1, size.magma_steps // 10),
        "train_dataset_dir": str(output_dir / "data" / "train"),
        "eval_dataset_dir": str(output_dir / "data" / "test"),
        "lm_name": str(output_dir / "language-model"),
        "tokenizer_name_or_path": str(output_dir / "language-model"),
        "encoder_name": "RN50",  # CLIP's ResNet design, shrunk by model_config below
        "image_size": size.image_size,
        "freeze_img_encoder": False,  # no CLIP weights offline: the encoder learns from scratch
        "adapter_config": {"mlp": {"adapter_type": "normal", "downsample_factor": size.adapter_downsample}},
        "use_image_embed_layernorm": True,
        "image_embed_dropout_prob": 0.0,
        "model_config": {"vision_config": {"layers": [1, 1, 1, 1], "width": size.encoder_width}},
        "training_args": {
            "seed": seed,
            "use_cpu": True,
            "save_strategy": "no",  # the final model is saved; no intermediate checkpoints
            "dataloader_num_workers": 1,  # decode and preprocess images beside the training process
            "dataloader_persistent_workers": True,
            "disable_tqdm": False,
        },
    }


def train_magma(size: DemoSize, seed: int, output_dir: Path):
    """Train MAGMA as `magma-hf train output_dir/train_config.yml` would; returns the trainer."""
    values = magma_training_config(size, seed, output_dir)
    (output_dir / "train_config.yml").write_text(yaml.safe_dump(values, sort_keys=False))
    return train(MagmaTrainingConfig.from_dict(values))


# ---------------------------------------------------------------------------------------------------------------------
# 4. Evaluation


def accuracy(predictions: list[str], references: list[str]) -> float:
    return sum(p == r for p, r in zip(predictions, references)) / len(references)


def majority_share(references: list[str]) -> float:
    """Chance level: the accuracy of always giving the most common reference."""
    return max(references.count(r) for r in set(references)) / len(references)


def language_model_unchanged(model, language_model_dir: Path) -> bool:
    """Whether every GPT-J weight of `model` equals, bit for bit, the pretrained language model's."""
    pretrained = load_file(str(language_model_dir / MODEL_WEIGHTS_FILE))
    weights = {gptj_name(name): param for name, param in model.gptj_named_parameters()}
    if set(weights) != set(pretrained):
        return False
    return all(torch.equal(param.detach().cpu(), pretrained[name]) for name, param in weights.items())


def evaluate_knowledge_transfer(model, processor, images, digits, language_model_dir: Path) -> dict:
    """Each question of `QUESTIONS` about each image, with the image, blind, and in text (the number's name in place
    of the image, asked of the language model alone through the same processor: what it knows)."""
    language_model = GPTJForCausalLM.from_pretrained(language_model_dir)
    results = {}
    for name, question in QUESTIONS.items():
        references = [question.answer(digit) for digit in digits]
        prompts = [question.prompt] * len(images)
        answers = generate_answers(model, processor, prompts, images, **GENERATION)
        blind = generate_answers(model, processor, prompts, images, blind=True, **GENERATION)
        in_text = [f"{NUMBER_WORDS[digit]}\n{question.prompt}" for digit in digits]
        results[name] = {
            "question": question.prompt,
            "accuracy": accuracy(answers, references),
            "blind_accuracy": accuracy(blind, references),
            "chance": majority_share(references),
            "text_accuracy": accuracy(generate_answers(language_model, processor, in_text, **GENERATION), references),
            "answers": answers,
        }
    return results


# ---------------------------------------------------------------------------------------------------------------------
# 5. Contact sheet


def contact_sheet(cells: list[tuple[Image.Image, list[tuple[str, bool]]]], columns: int, title: str) -> Image.Image:
    """A grid of images under a title, each image with lines of text under it, green when right and red when wrong."""
    size, line_height, margin, title_height = 96, 16, 10, 28
    n_lines = max(len(lines) for _, lines in cells)
    cell_width, cell_height = size + 60, size + 6 + n_lines * line_height
    rows = -(-len(cells) // columns)
    width, height = columns * cell_width + margin, title_height + rows * (cell_height + margin) + margin
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((margin, margin), title, fill="black", font=ImageFont.load_default(size=14))
    font = ImageFont.load_default(size=12)
    for n, (image, lines) in enumerate(cells):
        x = margin + (n % columns) * cell_width
        y = title_height + margin + (n // columns) * (cell_height + margin)
        sheet.paste(image.convert("RGB").resize((size, size), Image.NEAREST), (x, y))
        for k, (text, right) in enumerate(lines):
            draw.text((x, y + size + 4 + k * line_height), text, fill=(0, 120, 0) if right else (200, 0, 0), font=font)
    return sheet


def pick_sheet_images(digits: list[int], per_digit: int) -> list[int]:
    """Indices of the first `per_digit` held-out images of each digit, row by row: one column per digit."""
    by_digit = {d: [n for n, digit in enumerate(digits) if digit == d][:per_digit] for d in range(10)}
    return [by_digit[d][row] for row in range(per_digit) for d in range(10) if row < len(by_digit[d])]


def caption_with_pipeline(model_dir: Path, images: list[Image.Image], digits: list[int]):
    """Reload the saved model folder as users would and caption `images` (and ask the parity question) with it.

    Returns the pipeline's model, its captions, its parity answers and the contact sheet.
    """
    captioner = pipeline("image-to-text", model=str(model_dir), trust_remote_code=True, device="cpu")
    greedy = {"do_sample": False, "max_new_tokens": GENERATION["max_new_tokens"]}

    def texts(outputs) -> list[str]:  # one `[{"generated_text": ...}]` per image (a bare dict when batched)
        return [answer_text((o[0] if isinstance(o, list) else o)["generated_text"]) for o in outputs]

    captions = texts(captioner(images, generate_kwargs=greedy, batch_size=16))
    parity = QUESTIONS["parity"]
    answers = texts(captioner(images, text=[parity.prompt] * len(images), generate_kwargs=greedy, batch_size=16))
    cells = [
        (image, [(caption, caption == caption_for(digit)), (f"odd? {answer}", answer == parity.answer(digit))])
        for image, caption, answer, digit in zip(images, captions, answers, digits)
    ]
    title = (
        f"Held-out digits, reloaded with pipeline('image-to-text'): the caption, and the answer to {parity.prompt!r} "
        "(asked in text pretraining only). Green: right, red: wrong."
    )
    return captioner.model, captions, answers, contact_sheet(cells, columns=10, title=title)


# ---------------------------------------------------------------------------------------------------------------------
# The command


def demo_files(output_dir: Path) -> dict[str, str]:
    """The files under the demo's outputs in `output_dir`, by path relative to it: their sha256."""
    files = {}
    for name in OUTPUTS:
        path = output_dir / name
        for file in sorted([path] if path.is_file() else path.rglob("*") if path.is_dir() else []):
            if file.is_file() and not file.is_symlink():
                files[file.relative_to(output_dir).as_posix()] = sha256_of(file)
    return files


def write_demo_manifest(output_dir: Path) -> None:
    """Record in the marker every file a complete run wrote: a rerun replaces its outputs only while they are so."""
    manifest = {"written_by": "magma-hf demo", "note": MARKER_NOTE, "files": demo_files(output_dir)}
    write_text_atomically(output_dir / MARKER, json.dumps(manifest, indent=2) + "\n")


def prepare_output_dir(output_dir: Path) -> None:
    """Create `output_dir`; a previous demo's outputs there are replaced, anything else there is an error: a folder
    the demo did not write, or (after a complete run, whose files the marker records) a file under its outputs that
    was added or changed since, such as a Space written into its model folder."""
    if output_dir.exists() and any(output_dir.iterdir()):
        if not (output_dir / MARKER).is_file():
            raise FileExistsError(
                f"{output_dir} exists, is not empty and was not written by `magma-hf demo`: choose another "
                "--output-dir (nothing was changed)"
            )
        try:
            recorded = json.loads((output_dir / MARKER).read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError, TypeError):  # a run killed before its end recorded nothing: all ours
            recorded = None
        if isinstance(recorded, dict):
            changed = sorted(name for name, digest in demo_files(output_dir).items() if recorded.get(name) != digest)
            if changed:
                shown = ", ".join(changed[:10]) + (f" and {len(changed) - 10} more" if len(changed) > 10 else "")
                raise FileExistsError(
                    f"{output_dir} holds files that `magma-hf demo` did not write, or that changed since: {shown}. "
                    "A rerun would delete them: move them away, or choose another --output-dir (nothing was changed)"
                )
        for name in OUTPUTS:
            path = output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(output_dir / MARKER, MARKER_NOTE + "\n")  # no files recorded until the run completes


def write_predictions(
    path: Path, image_paths: list[str], digits: list[int], references: list[str], predictions: dict[str, list[str]]
) -> None:
    """One json line per held-out image: its file, digit, reference caption and every generated text about it."""
    with open(path, "w", encoding="utf-8") as file:
        for n, image_path in enumerate(image_paths):
            record = {"image_path": image_path, "digit": digits[n], "reference": references[n]}
            record.update({name: texts[n] for name, texts in predictions.items()})
            file.write(json.dumps(record) + "\n")


def print_table(metrics: dict) -> None:
    rows = [
        (f"held-out images ({metrics['train_images']} trained on)", f"{metrics['test_images']}"),
        ("caption accuracy (exact match, greedy)", f"{metrics['caption_accuracy']:.3f}"),
        ("  blank images (blind baseline)", f"{metrics['blind_caption_accuracy']:.3f}"),
        ("language model bitwise unchanged", str(metrics["lm_unchanged"])),
    ]
    for result in metrics["knowledge_transfer"].values():
        rows.append((f"'{result['question']}' accuracy", f"{result['accuracy']:.3f}"))
        blind_chance_text = "{blind_accuracy:.3f} / {chance:.3f} / {text_accuracy:.3f}".format(**result)
        rows.append(("  blind / chance / from the number's name", blind_chance_text))
    rows.append(("MAGMA training (s)", f"{metrics['train_seconds']:.0f}"))
    rows.append(("total (s)", f"{metrics['total_seconds']:.0f}"))
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def run_demo(output_dir: str | os.PathLike = "demo-output", seed: int = 0, size: str | DemoSize = "full") -> dict:
    """Run the whole demo; returns the metrics (also written to `output_dir/metrics.json`)."""
    size = SIZES[size] if isinstance(size, str) else size
    output_dir = Path(output_dir)
    seconds: dict[str, float] = {}
    start = last = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal last
        now = time.perf_counter()
        seconds[stage], last = now - last, now

    prepare_output_dir(output_dir)
    set_seed(seed)

    print("1/5 Building the image-caption dataset from scikit-learn's handwritten digits")
    train_set, test_set = build_datasets(output_dir / "data", size, seed)
    lap("dataset")

    print("2/5 Pretraining a small GPT-J on text alone")
    corpus = text_corpus(size.text_documents, seed)
    pretrain_language_model(corpus, train_tokenizer(corpus), size, seed, output_dir / "language-model")
    lap("text_pretraining")

    print("3/5 Training MAGMA (frozen GPT-J; adapters, image prefix, image encoder) on the image-caption pairs")
    trainer = train_magma(size, seed, output_dir)
    model, processor = trainer.model, trainer.processing_class
    lap("magma_training")

    print("4/5 Evaluating on the held-out images")
    images = [row["image"] for row in test_set]
    columns = test_set.with_format(None)  # the other columns, without decoding the images again
    references = [captions[0] for captions in columns["captions"]]
    digits = [json.loads(metadata)["digit"] for metadata in columns["metadata"]]
    no_prompts = [""] * len(images)  # the image alone: its caption
    captions = generate_answers(model, processor, no_prompts, images, **GENERATION)
    blind_captions = generate_answers(model, processor, no_prompts, images, blind=True, **GENERATION)
    transfer = evaluate_knowledge_transfer(model, processor, images, digits, output_dir / "language-model")
    lm_unchanged = language_model_unchanged(model, output_dir / "language-model")
    lap("evaluation")

    print("5/5 Reloading the saved model with pipeline('image-to-text') and captioning held-out images")
    shown = pick_sheet_images(digits, size.sheet_images_per_digit)
    reloaded, sheet_captions, _, sheet = caption_with_pipeline(
        output_dir / "magma", [images[n] for n in shown], [digits[n] for n in shown]
    )
    sheet.save(output_dir / "contact_sheet.png")
    lm_unchanged = lm_unchanged and language_model_unchanged(reloaded, output_dir / "language-model")
    lap("pipeline")

    predictions = {"caption": captions, "blind_caption": blind_captions}
    predictions.update({f"{name}_answer": result["answers"] for name, result in transfer.items()})
    write_predictions(output_dir / "predictions.jsonl", columns["image_path"], digits, references, predictions)
    metrics = {
        "caption_accuracy": accuracy(captions, references),
        "blind_caption_accuracy": accuracy(blind_captions, references),
        "lm_unchanged": lm_unchanged,
        # the reloaded pipeline must caption exactly as the trained model did
        "pipeline_matches_model": sheet_captions == [captions[n] for n in shown],
        "knowledge_transfer": {
            name: {key: value for key, value in result.items() if key != "answers"} for name, result in transfer.items()
        },
        "train_images": len(train_set),
        "test_images": len(test_set),
        "seed": seed,
        "torch_threads": torch.get_num_threads(),
        "size": asdict(size),
        "stage_seconds": seconds,
        "train_seconds": seconds["magma_training"],
        "total_seconds": time.perf_counter() - start,
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_demo_manifest(output_dir)
    print_table(metrics)
    print(f"\nModel: {output_dir / 'magma'}   contact sheet: {output_dir / 'contact_sheet.png'}")
    print(f"Try it in the browser: {demo_app_command(output_dir / 'magma', output_dir / 'data' / 'test' / 'images')}")
    return metrics


def default_threads() -> int:
    """Tiny models gain little from many threads, and threads that wait for a busy core cost a lot: keep one core for
    the data loader (MAGMA training decodes and preprocesses images in a worker process)."""
    return max(1, min(4, (os.cpu_count() or 1) - 1))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="demo-output", help="Where everything goes (default: demo-output)")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the data split and of every training run")
    parser.add_argument(
        "--size", choices=sorted(SIZES), default="full", help="full: make demo's run; small: a quick one (tests)"
    )
    parser.add_argument(
        "--threads", type=int, default=default_threads(), help="torch CPU threads (default: one core fewer than the "
        "machine has, at most 4; another core loads the images while MAGMA trains)"
    )


def run(args: argparse.Namespace) -> int:
    std_logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    std_logging.getLogger("magma_hf").setLevel(std_logging.INFO)  # as `magma-hf train`: sample captions, set-up
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        run_demo(args.output_dir, seed=args.seed, size=args.size)
    finally:
        torch.set_num_threads(threads)
    return 0


__all__ = ["QUESTIONS", "SIZES", "DemoSize", "run_demo"]
