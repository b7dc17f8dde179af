"""The reference side of tests/vllm: tiny random MAGMA folders and what `MagmaForConditionalGeneration.generate` makes
of a mixed batch of prompts, written for the vLLM tests (which run in another environment, where the transformers
model cannot be imported).

Run with the main environment's python (`MAGMA_HF_REFERENCE_PYTHON`, the Makefile's `.venv/bin/python`):

    python -m tests.vllm.make_reference OUTPUT_DIR

OUTPUT_DIR gets one model folder per adapter layout (`LAYOUTS`), the images as PNG files, a folder whose tokenizer
lacks `<|image|>` and `reference.json`: per layout and prompt the greedy continuation ids (cut after the first
end-of-text), the first token's log-probability and the cleaned-up text, and per layout the answers of
`magma_hf.generation.generate_answers` (batched, left-padded) for the same prompts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from magma_hf.generation import generate_answers
from tests.helpers import make_processor, make_tokenizer, random_image, save_tiny_magma, tiny_config
from tests.vllm.reference_setup import LAYOUTS, MAX_NEW_TOKENS, N_IMAGES, NO_IMAGE_TOKEN, PROMPTS, TEXT_CONFIG


def reference_generation(model, processor, prompt: str, images: list) -> dict:
    """Greedy ids (cut after the first end-of-text), the first token's log-probability and the text, for one
    prompt alone (no padding)."""
    inputs = processor(images=images or None, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, output_logits=True, return_dict_in_generate=True
        )
    ids = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    eos = processor.tokenizer.eos_token_id
    if eos in ids:
        ids = ids[: ids.index(eos) + 1]
    first_logprobs = torch.log_softmax(out.logits[0][0].float(), dim=-1)
    return {
        "token_ids": ids,
        "first_logprob": float(first_logprobs[ids[0]]),
        "text": processor.post_process_image_text_to_text([ids])[0],
        "prompt_length": int(inputs["input_ids"].shape[1]),
    }


def main(output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    processor = make_processor(tokenizer)
    images = [random_image(seed) for seed in range(N_IMAGES)]
    image_files = []
    for number, image in enumerate(images):
        image.save(output_dir / f"image{number}.png")
        image_files.append(f"image{number}.png")
    reference = {"prompts": PROMPTS, "images": image_files, "max_new_tokens": MAX_NEW_TOKENS, "layouts": {}}
    for layout, adapter_config in LAYOUTS.items():
        config = tiny_config(
            tokenizer, adapter_config=adapter_config, text_config={**TEXT_CONFIG, "vocab_size": len(tokenizer)}
        )
        model = save_tiny_magma(output_dir / layout, tokenizer, processor, config=config)
        prompt_images = [[images[i] for i in indices] for _, indices in PROMPTS]
        reference["layouts"][layout] = [
            reference_generation(model, processor, prompt, sample_images)
            for (prompt, _), sample_images in zip(PROMPTS, prompt_images)
        ]
        reference.setdefault("answers", {})[layout] = generate_answers(
            model, processor, [prompt for prompt, _ in PROMPTS], prompt_images, max_new_tokens=MAX_NEW_TOKENS
        )
    # A folder whose tokenizer lacks <|image|>: the model of the first layout with a plain GPT-2 style tokenizer.
    broken = output_dir / NO_IMAGE_TOKEN
    save_tiny_magma(broken, tokenizer, processor, config=tiny_config(tokenizer, text_config=TEXT_CONFIG))
    make_tokenizer(with_image_token=False).save_pretrained(broken)
    (output_dir / "reference.json").write_text(json.dumps(reference, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
