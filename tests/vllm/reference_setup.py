"""What the vLLM tests compare: the adapter layouts, prompts and engine settings, shared by `make_reference.py` (the
transformers side, `.venv`) and the tests (vLLM's side, `.venv-vllm`). Plain data: it imports nothing."""

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


MAX_IMAGES = 2  # limit_mm_per_prompt of the tests' engines
# vLLM settings of the tests' engines (offline and served).
ENGINE_KWARGS = {
    "dtype": "float32",
    "max_model_len": 256,
    "max_num_seqs": 8,
    "enforce_eager": True,  # compiling a model this small costs more than it saves
    "limit_mm_per_prompt": {"image": MAX_IMAGES},
}
