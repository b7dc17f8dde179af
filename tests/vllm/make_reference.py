"""The reference side of tests/vllm: tiny random MAGMA folders and what `MagmaForConditionalGeneration.generate` makes
of a mixed batch of prompts, written for the vLLM tests (which run in another environment, where the transformers
model cannot be imported).

Run with the main environment's python (`MAGMA_HF_REFERENCE_PYTHON`, the Makefile's `.venv/bin/python`):

    python tests/vllm/make_reference.py OUTPUT_DIR

OUTPUT_DIR gets one model folder per adapter layout (`LAYOUTS`), the images as PNG files, a folder whose tokenizer
lacks `<|image|>` and `reference.json`: per layout and prompt the greedy continuation ids (cut after the first
end-of-text), the first token's log-probability and the cleaned-up text.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers

from helpers import make_processor, make_tokenizer, random_image, save_tiny_magma, tiny_config  # noqa: E402

# One folder per adapter layout; float32, head_dim 32 (vLLM's CPU attention rejects 16).
LAYOUTS = {
    "normal": {"mlp": {"adapter_type": "normal", "downsample_factor": 4}},
    "mlp_attention": {
        "mlp": {"adapter_type": "normal", "downsample_factor": 4},
        "attention": {"adapter_type": "normal", "downsample_factor": 4},
    },
    "parallel": {
        "mlp": {"adapter_type": "parallel", "downsample_factor": 4, "add_layernorm": True},
        "attention": {"adapter_type": "parallel", "downsample_factor": 2, "add_layernorm": True},
    },
    "scaled_parallel": {
        "mlp": {"adapter_type": "scaled_parallel", "downsample_factor": 4, "add_layernorm": True},
        "attention": {"adapter_type": "scaled_parallel", "downsample_factor": 4, "add_layernorm": True},
    },
}
# head_dim 32; a wide initialisation makes the random logits peaked, so greedy tokens depend on the input.
TEXT_CONFIG = {"n_embd": 64, "n_head": 2, "rotary_dim": 16, "initializer_range": 0.3}
MAX_NEW_TOKENS = 8
N_IMAGES = 3
# (prompt, image indices): 0, 1 and 2 images, with and without <|image|> placeholders.
PROMPTS = [
    ("a photo of a cat sitting on", []),
    ("a dog running on the beach", [0]),
    ("Q: What is in the picture? <|image|> A:", [1]),
    ("<|image|> a cat.\n<|image|> a", [2, 0]),
    ("two people riding", [1, 2]),
]
NO_IMAGE_TOKEN = "no_image_token"


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
        reference["layouts"][layout] = [
            reference_generation(model, processor, prompt, [images[i] for i in indices]) for prompt, indices in PROMPTS
        ]
    # A folder whose tokenizer lacks <|image|>: the model of the first layout with a plain GPT-2 style tokenizer.
    broken = output_dir / NO_IMAGE_TOKEN
    save_tiny_magma(broken, tokenizer, processor, config=tiny_config(tokenizer, text_config=TEXT_CONFIG))
    make_tokenizer(with_image_token=False).save_pretrained(broken)
    (output_dir / "reference.json").write_text(json.dumps(reference, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
