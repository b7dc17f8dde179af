"""The original MAGMA checkpoint and forward pass, written from the spec (shared/spec/original-magma-checkpoint.md),
independently of magma_hf: the key layout, tiny random checkpoints in DeepSpeed's file layout, and the original
model's logits (GPT-J blocks of the GPT-Neo fork with `jax=True`, MAGMA's adapters, CLIP's ModifiedResNet trunk).

The benchmark (tests/benchmarks/bench_conversion.py) reuses `original_layout` for the full-size synthetic checkpoint.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet


@dataclass
class OriginalModel:
    """Sizes of an original MAGMA (defaults: MAGMA_v1, GPT-J-6B + CLIP RN50x16) and its adapter_config."""

    hidden: int = 4096
    layers: int = 28
    heads: int = 16
    rotary_dim: int = 64
    positions: int = 2048
    vocab: int = 50400  # rows of the LM head
    tokens: int = 50258  # rows of the input embedding: GPT-2 + <|image|>
    vision_layers: tuple[int, ...] = (6, 8, 18, 8)
    vision_width: int = 96
    image_size: int = 384
    adapter_config: dict = field(default_factory=lambda: {"mlp": {"adapter_type": "normal", "downsample_factor": 4}})
    image_layernorm: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def features(self) -> int:
        return self.vision_width * 32

    def adapter(self, location: str) -> dict | None:
        return self.adapter_config.get(location)


# Where the original module tree put a block's parts (magma/adapters.py wrappers), by adapter type.
ATTENTION_ROOT = {
    None: "attn",
    "normal": "attn.attn_block",
    "parallel": "attn.module",
    "scaled_parallel": "attn.module",
}
MLP_ROOT = {None: "mlp", "normal": "mlp.0", "parallel": "mlp.module", "scaled_parallel": "mlp.module"}


def adapter_root(location: str, adapter_type: str) -> str:
    if location == "attention":
        return "attn.adapter"
    return "mlp.1.adapter" if adapter_type == "normal" else "mlp.adapter"


def roots(model: OriginalModel) -> tuple[str, str]:
    attention, mlp = model.adapter("attention"), model.adapter("mlp")
    return (
        ATTENTION_ROOT[attention["adapter_type"] if attention else None],
        MLP_ROOT[mlp["adapter_type"] if mlp else None],
    )


def adapter_keys(model: OriginalModel, location: str, prefix: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """`Adapter.adapter` is nn.Sequential([LayerNorm,] Linear(d, d/f), ReLU, Linear(d/f, d))."""
    settings = model.adapter(location)
    if not settings:
        return {}
    d = model.hidden
    bottleneck = d // settings.get("downsample_factor", 4)
    root = prefix + adapter_root(location, settings["adapter_type"])
    keys = {}
    shift = 0
    if settings.get("add_layernorm"):
        keys[f"{root}.0.weight"] = ((d,), "ln_weight")
        keys[f"{root}.0.bias"] = ((d,), "small")
        shift = 1
    keys[f"{root}.{shift}.weight"] = ((bottleneck, d), "weight")
    keys[f"{root}.{shift}.bias"] = ((bottleneck,), "small")
    keys[f"{root}.{shift + 2}.weight"] = ((d, bottleneck), "weight")
    keys[f"{root}.{shift + 2}.bias"] = ((d,), "small")
    if settings["adapter_type"] == "scaled_parallel":
        keys[prefix + ("attn" if location == "attention" else "mlp") + ".adapter_scale"] = ((1,), "scale")
    return keys


def block_keys(model: OriginalModel, i: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """One GPT-J block of the fork (`lm.transformer.h.{i}.`), adapters and attention buffers included."""
    d, p = model.hidden, model.positions
    prefix = f"lm.transformer.h.{i}."
    attention_root, mlp_root = roots(model)
    attention = f"{prefix}{attention_root}.attention."
    keys = {
        prefix + "ln_1.weight": ((d,), "ln_weight"),
        prefix + "ln_1.bias": ((d,), "small"),
        attention + "bias": ((1, 1, p, p), "causal_mask"),
        attention + "masked_bias": ((), "masked_bias"),
        attention + "scale_attn": ((), "scale_attn"),
        attention + "k_proj.weight": ((d, d), "weight"),
        attention + "v_proj.weight": ((d, d), "weight"),
        attention + "q_proj.weight": ((d, d), "weight"),
        attention + "out_proj.weight": ((d, d), "weight"),
        attention + "sin": ((p, model.rotary_dim // 2), "sin"),
        attention + "cos": ((p, model.rotary_dim // 2), "cos"),
        f"{prefix}{mlp_root}.c_fc.weight": ((4 * d, d), "weight"),
        f"{prefix}{mlp_root}.c_fc.bias": ((4 * d,), "small"),
        f"{prefix}{mlp_root}.c_proj.weight": ((d, 4 * d), "weight"),
        f"{prefix}{mlp_root}.c_proj.bias": ((d,), "small"),
    }
    keys.update(adapter_keys(model, "mlp", prefix))
    keys.update(adapter_keys(model, "attention", prefix))
    return keys


def encoder_keys(model: OriginalModel) -> dict[str, tuple[tuple[int, ...], str]]:
    """`image_prefix.enc.*`: CLIP's ModifiedResNet (open_clip uses the same names) without `attnpool`."""
    with torch.device("meta"):
        encoder = ModifiedResNet(
            list(model.vision_layers),
            model.features,
            max(1, model.features // 64),
            model.image_size,
            model.vision_width,
        )
    keys = {}
    for name, tensor in encoder.state_dict().items():
        if name.startswith("attnpool."):
            continue
        kind = "conv"
        if ".bn" in name or name.startswith("bn") or "downsample.1" in name:
            kind = {"weight": "ln_weight", "bias": "small", "running_mean": "small", "running_var": "variance"}.get(
                name.rsplit(".", 1)[1], "count"
            )
        keys["image_prefix.enc." + name] = (tuple(tensor.shape), kind)
    return keys


def original_layout(model: OriginalModel) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every key of the original `state_dict()` -> (shape, kind), aliases excluded (see `alias_keys`)."""
    d = model.hidden
    keys = {"lm.transformer.wte.weight": ((model.tokens, d), "embedding")}
    for i in range(model.layers):
        keys.update(block_keys(model, i))
    keys["lm.transformer.ln_f.weight"] = ((d,), "ln_weight")
    keys["lm.transformer.ln_f.bias"] = ((d,), "small")
    keys["lm.lm_head.weight"] = ((model.vocab, d), "weight")
    keys["lm.lm_head.bias"] = ((model.vocab,), "head_bias")
    keys.update(encoder_keys(model))
    keys["image_prefix.proj.weight"] = ((d, model.features), "weight")
    keys["image_prefix.proj.bias"] = ((d,), "small")
    if model.image_layernorm:
        keys["image_prefix.ln.weight"] = ((d,), "ln_weight")
        keys["image_prefix.ln.bias"] = ((d,), "small")
    return keys


def alias_keys(layout: dict) -> dict[str, str]:
    """The top-level `word_embedding = lm.transformer.wte` and `transformer = lm.transformer.h`: alias -> original."""
    aliases = {"word_embedding.weight": "lm.transformer.wte.weight"}
    for key in layout:
        if key.startswith("lm.transformer.h."):
            aliases["transformer." + key.removeprefix("lm.transformer.h.")] = key
    return aliases


def rotary_tables(model: OriginalModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The fork's `fixed_pos_embedding`: sin and cos of position * 10000^(-2j / rotary_dim), [positions, rotary/2]."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, model.rotary_dim, 2) / model.rotary_dim))
    angles = torch.einsum("i,j->ij", torch.arange(model.positions).float(), inv_freq).float()
    return torch.sin(angles), torch.cos(angles)


def value_for(kind: str, shape: tuple[int, ...], model: OriginalModel, generator: torch.Generator) -> torch.Tensor:
    """Random weights of a scale that keeps a tiny model's activations lively, exact values for the buffers."""

    def randn(std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * std + mean

    if kind == "causal_mask":
        p = model.positions
        return torch.tril(torch.ones(p, p, dtype=torch.uint8)).view(1, 1, p, p).bool()
    if kind == "masked_bias":
        return torch.tensor(-1e9)
    if kind == "scale_attn":
        return torch.sqrt(torch.tensor(model.head_dim).float())
    if kind in ("sin", "cos"):
        return rotary_tables(model)[0 if kind == "sin" else 1]
    if kind == "count":
        return torch.tensor(int(torch.randint(1, 10**6, (), generator=generator)))
    if kind == "variance":
        return torch.rand(shape, generator=generator) + 0.5
    if kind == "ln_weight":
        return randn(0.1, 1.0)
    if kind == "small":
        return randn(0.05)
    if kind == "scale":
        return torch.tensor([0.7])
    if kind == "head_bias":
        bias = randn(0.05)
        bias[model.tokens :] = -100.0  # as GPT-J: the ids beyond the tokenizer are never the likeliest
        return bias
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    if kind == "embedding":
        return randn(1.0)
    return randn(1.0 / math.sqrt(fan_in))  # weight, conv


def tiny_original_model(tokens: int, image_size: int = 64, adapter_config: dict | None = None) -> OriginalModel:
    return OriginalModel(
        hidden=64,
        layers=2,
        heads=4,
        rotary_dim=8,
        positions=256,
        vocab=tokens + 6,
        tokens=tokens,
        vision_layers=(1, 1, 1, 1),
        vision_width=8,
        image_size=image_size,
        adapter_config=adapter_config if adapter_config is not None else {"mlp": {"adapter_type": "normal"}},
    )


def original_state_dict(model: OriginalModel, dtype: torch.dtype = torch.float32, seed: int = 0) -> OrderedDict:
    """A random state dict as the original `Magma.state_dict()` returns it: `lm.*`, the aliases `word_embedding.*` and
    `transformer.*` (the same tensor objects, as in the real module), `image_prefix.*`; floating tensors in `dtype`
    (DeepSpeed's fp16 engine halves every floating buffer: -1e9 becomes -inf), the mask bool, counts int64."""
    generator = torch.Generator().manual_seed(seed)
    layout = original_layout(model)
    values = OrderedDict()
    for key, (shape, kind) in layout.items():
        tensor = value_for(kind, shape, model, generator)
        values[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    state_dict = OrderedDict()
    for key in layout:  # the original module's order: lm, word_embedding, transformer, image_prefix
        if key.startswith("image_prefix.") and "word_embedding.weight" not in state_dict:
            for alias, original in alias_keys(layout).items():
                state_dict[alias] = values[original]
        state_dict[key] = values[key]
    state_dict._metadata = OrderedDict({"": {"version": 1}})  # as nn.Module.state_dict leaves it
    return state_dict


def deepspeed_checkpoint(state_dict: dict) -> dict:
    """DeepSpeed's model-states dict (engine._save_checkpoint) with MAGMA's client state (`global_step`, `config`)."""
    return {
        "module": state_dict,
        "buffer_names": [key for key in state_dict if key.rsplit(".", 1)[-1] in ("bias", "masked_bias", "sin", "cos")],
        "optimizer": None,  # ZeRO keeps it in separate files
        "lr_scheduler": {"last_batch_iteration": 149999},
        "sparse_tensor_module_names": set(),
        "skipped_steps": 12,
        "global_steps": 150000,
        "global_samples": 38400000,
        "dp_world_size": 32,
        "mp_world_size": 1,
        "ds_config": {
            "train_batch_size": 256,
            "gradient_accumulation_steps": 8,
            "gradient_clipping": 1.0,
            "fp16": {"enabled": True, "loss_scale_window": 250},
            "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 300000, "warmup_max_lr": 8e-4}},
            "zero_optimization": {"stage": 2, "load_from_fp32_weights": False},
        },
        "ds_version": "0.5.8",
        "global_step": 150000,
        "config": None,
    }


# --------------------------------------------------------------------------------------------------------------------
# The original forward pass, in float32
# --------------------------------------------------------------------------------------------------------------------


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def rotate_interleaved(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """GPT-J rotary on the first `rotary_dim` features of each head, on interleaved pairs (x[2j], x[2j+1]).

    x: [b, s, heads, head_dim]."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    angles = positions.double()[:, None] * inv_freq[None, :]  # [s, rotary/2]
    sin, cos = angles.sin().float()[None, :, None, :], angles.cos().float()[None, :, None, :]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    even, odd = rot[..., 0::2], rot[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat((rotated, rest), dim=-1)


class OriginalMagma:
    """The original model's computation on an original state dict (keys as in the checkpoint), float32, eval mode."""

    def __init__(self, model: OriginalModel, state_dict: dict):
        self.model = model
        self.sd = {key: (t.float() if t.is_floating_point() else t) for key, t in state_dict.items()}
        self.encoder = ModifiedResNet(
            list(model.vision_layers),
            model.features,
            max(1, model.features // 64),
            model.image_size,
            model.vision_width,
        )
        del self.encoder.attnpool  # the original replaced it by a reshape
        encoder_state = {k.removeprefix("image_prefix.enc."): v for k, v in self.sd.items() if ".enc." in k}
        self.encoder.load_state_dict(encoder_state, strict=True)
        self.encoder.eval()

    def linear(self, x, name, bias=True):
        return F.linear(x, self.sd[name + ".weight"], self.sd.get(name + ".bias") if bias else None)

    def layer_norm(self, x, name):
        return F.layer_norm(x, (x.shape[-1],), self.sd[name + ".weight"], self.sd[name + ".bias"], eps=1e-5)

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ImagePrefix: encoder trunk -> [b, d, h, w] -> [b, h*w, d] -> proj -> (dropout: off) -> ln."""
        with torch.no_grad():
            x = self.encoder.stem(pixel_values.float())
            x = self.encoder.layer4(self.encoder.layer3(self.encoder.layer2(self.encoder.layer1(x))))
        x = x.flatten(2).transpose(1, 2)  # rearrange "b d h w -> b (h w) d"
        x = self.linear(x, "image_prefix.proj")
        return self.layer_norm(x, "image_prefix.ln") if self.model.image_layernorm else x

    def adapter(self, x, location: str, prefix: str) -> torch.Tensor:
        """`Adapter.adapter(x)`: up(relu(down(x))), LayerNorm first with add_layernorm; scaled if scaled_parallel."""
        settings = self.model.adapter(location)
        root = prefix + adapter_root(location, settings["adapter_type"])
        shift = 0
        if settings.get("add_layernorm"):
            x = self.layer_norm(x, f"{root}.0")
            shift = 1
        out = self.linear(torch.relu(self.linear(x, f"{root}.{shift}")), f"{root}.{shift + 2}")
        if settings["adapter_type"] == "scaled_parallel":
            out = out * self.sd[prefix + ("attn" if location == "attention" else "mlp") + ".adapter_scale"]
        return out

    def attention(self, x: torch.Tensor, prefix: str, root: str) -> torch.Tensor:
        m = self.model
        b, s, _ = x.shape
        name = f"{prefix}{root}.attention."
        q, k, v = (
            self.linear(x, name + p, bias=False).view(b, s, m.heads, m.head_dim) for p in ("q_proj", "k_proj", "v_proj")
        )
        positions = torch.arange(s)
        q, k = rotate_interleaved(q, positions, m.rotary_dim), rotate_interleaved(k, positions, m.rotary_dim)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(m.head_dim)
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, s, m.hidden)
        return self.linear(out, name + "out_proj", bias=False)

    def block(self, h: torch.Tensor, i: int) -> torch.Tensor:
        """`x = ln_1(h); h + attn(x) + mlp(x)` with the adapters wrapped around attn and mlp."""
        prefix = f"lm.transformer.h.{i}."
        attention_root, mlp_root = roots(self.model)
        x = self.layer_norm(h, prefix + "ln_1")
        a = self.attention(x, prefix, attention_root)
        if settings := self.model.adapter("attention"):
            a = a + self.adapter(a if settings["adapter_type"] == "normal" else x, "attention", prefix)
        y = self.linear(gelu_new(self.linear(x, f"{prefix}{mlp_root}.c_fc")), f"{prefix}{mlp_root}.c_proj")
        if settings := self.model.adapter("mlp"):
            y = y + self.adapter(y if settings["adapter_type"] == "normal" else x, "mlp", prefix)
        return h + a + y

    def logits(self, pixel_values: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        """The image embeddings, then the text's token embeddings; logits [b, n_image + n_text, vocab]."""
        text = F.embedding(text_ids, self.sd["lm.transformer.wte.weight"])
        h = torch.cat((self.image_embeddings(pixel_values), text), dim=1)
        for i in range(self.model.layers):
            h = self.block(h, i)
        h = self.layer_norm(h, "lm.transformer.ln_f")
        return self.linear(h, "lm.lm_head")

    def greedy(self, pixel_values: torch.Tensor, text_ids: torch.Tensor, steps: int) -> torch.Tensor:
        """magma/sampling.py with temperature 0: argmax, appended, the whole sequence recomputed each step."""
        ids = text_ids
        for _ in range(steps):
            next_id = self.logits(pixel_values, ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat((ids, next_id), dim=1)
        return ids[:, text_ids.shape[1] :]


def original_top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """magma/sampling.py's `top_p_filter`, as it behaves (notes/original-code-behaviour.md): on the probabilities at
    temperature 1, sorted descending, a token is set to -inf when the tokens ranked above it hold less than
    `1 - top_p` of the mass; the most likely token always stays. (A true nucleus keeps the head and drops the tail.)"""
    order = logits.argsort(dim=-1, descending=True)
    cumulative = F.softmax(logits.gather(-1, order), dim=-1).cumsum(-1)
    mass_above = torch.cat([torch.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], dim=-1)
    remove_sorted = mass_above < (1 - top_p)
    remove_sorted[..., 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def original_sampling_probs(logits: torch.Tensor, temperature: float = 0.7, top_p: float = 0.9) -> torch.Tensor:
    """The distribution the original's `generate` samples the next token from (top_k=0): the filter on the raw
    logits, the temperature after it."""
    return F.softmax(original_top_p_filter(logits, top_p) / temperature, dim=-1)
