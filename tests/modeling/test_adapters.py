"""MAGMA's adapters as a PEFT method on a plain GPTJForCausalLM, and their formulas."""

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import (
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from safetensors.torch import load_file
from transformers import GPTJConfig, GPTJForCausalLM

from magma_hf import MagmaAdapterConfig, MagmaAdapterLayer

V1 = {"mlp": {"adapter_type": "normal", "downsample_factor": 4}}
V2_LIKE = {
    "mlp": {"adapter_type": "scaled_parallel", "downsample_factor": 8, "add_layernorm": True},
    "attention": {"adapter_type": "parallel", "downsample_factor": 4},
}


def gptj(seed: int = 0) -> GPTJForCausalLM:
    torch.manual_seed(seed)
    config = GPTJConfig(
        n_embd=64, n_layer=2, n_head=4, rotary_dim=8, vocab_size=97, n_positions=64, bos_token_id=1, eos_token_id=1
    )
    return GPTJForCausalLM(config).eval()


def perturb_adapters(model: torch.nn.Module, seed: int = 1, scale: float = 0.2) -> None:
    """The original init (std 1e-3) barely moves the output; make the adapters matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".magma_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * scale)


@pytest.fixture
def input_ids():
    return torch.randint(2, 97, (2, 11), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def peft_model():
    model = get_peft_model(gptj(), MagmaAdapterConfig.from_magma_adapter_config(V2_LIKE, task_type="CAUSAL_LM"))
    perturb_adapters(model)
    return model.eval()


def test_get_peft_model_trains_only_the_adapters(peft_model):
    trainable = [name for name, param in peft_model.named_parameters() if param.requires_grad]
    assert trainable and all(".magma_" in name for name in trainable)
    assert any(".mlp.magma_scale." in name for name in trainable)
    assert any(".mlp.magma_norm." in name for name in trainable)
    assert any(".attn.magma_down." in name for name in trainable)
    assert not any(".attn.magma_scale." in name for name in trainable)  # plain parallel has no learned scale
    n_blocks = peft_model.config.n_layer
    # per block: mlp (down, up: weight+bias; norm: weight+bias; scale) + attention (down, up: weight+bias)
    assert len(trainable) == n_blocks * (7 + 4)


def test_adapter_only_save_and_reload_gives_identical_logits(peft_model, input_ids, tmp_path):
    expected = peft_model(input_ids).logits
    peft_model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(".magma_" in key for key in saved)
    assert not any(key.endswith(("q_proj.weight", "fc_in.weight", "wte.weight")) for key in saved)
    reloaded = PeftModel.from_pretrained(gptj(), tmp_path).eval()
    assert torch.equal(reloaded(input_ids).logits, expected)


def test_disable_adapter_is_exactly_plain_gptj(peft_model, input_ids):
    plain = gptj()(input_ids).logits
    assert not torch.allclose(peft_model(input_ids).logits, plain)
    with peft_model.disable_adapter():
        assert torch.equal(peft_model(input_ids).logits, plain)


def test_several_named_adapters_switch_with_set_adapter(peft_model, input_ids):
    first = peft_model(input_ids).logits
    peft_model.add_adapter("v1", MagmaAdapterConfig.from_magma_adapter_config(V1, task_type="CAUSAL_LM"))
    peft_model.set_adapter("v1")
    perturb_adapters(peft_model, seed=5)  # only the active adapter is trainable, but this perturbs both
    second = peft_model(input_ids).logits
    assert not torch.allclose(first, second)
    peft_model.set_adapter("default")
    default_again = peft_model(input_ids).logits
    peft_model.set_adapter("v1")
    assert torch.equal(peft_model(input_ids).logits, second)
    assert not torch.allclose(default_again, second)
    mlp = peft_model.base_model.model.transformer.h[0].mlp
    assert set(mlp.magma_down) == {"default", "v1"} and set(mlp.magma_scale) == {"default"}


def test_inject_adapter_in_model_and_state_dict_round_trip(input_ids):
    source = inject_adapter_in_model(MagmaAdapterConfig.from_magma_adapter_config(V2_LIKE), gptj())
    perturb_adapters(source)
    assert isinstance(source.transformer.h[1].mlp, MagmaAdapterLayer)
    assert isinstance(source.transformer.h[1].attn, MagmaAdapterLayer)
    state = get_peft_model_state_dict(source)
    assert "transformer.h.0.mlp.magma_scale" in state and "transformer.h.1.attn.magma_up.weight" in state
    target = inject_adapter_in_model(MagmaAdapterConfig.from_magma_adapter_config(V2_LIKE), gptj())
    set_peft_model_state_dict(target, state)
    assert torch.equal(target(input_ids).logits, source(input_ids).logits)


def test_unload_returns_plain_gptj(peft_model, input_ids):
    base = peft_model.unload()
    assert type(base) is GPTJForCausalLM
    assert not any(isinstance(module, MagmaAdapterLayer) for module in base.modules())
    assert torch.equal(base(input_ids).logits, gptj()(input_ids).logits)


def test_merge_and_unload_fails_clearly_and_leaves_the_model_intact(peft_model, input_ids):
    before = peft_model(input_ids).logits
    with pytest.raises(ValueError, match="cannot be merged"):
        peft_model.merge_and_unload()
    assert isinstance(peft_model.base_model.model.transformer.h[0].mlp, MagmaAdapterLayer)
    assert torch.equal(peft_model(input_ids).logits, before)


def test_generate_uses_the_adapters_with_and_without_kv_cache(peft_model, input_ids):
    prompt = input_ids[:1]
    generated = peft_model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    sequence = prompt
    for _ in range(6):  # greedy decoding by hand, full forward each step
        next_token = peft_model(sequence).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(generated, sequence)
    assert torch.equal(
        peft_model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, use_cache=False), sequence
    )
    with peft_model.disable_adapter():
        plain = peft_model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(plain, gptj().generate(input_ids=prompt, max_new_tokens=6, do_sample=False))


def bottleneck(layer: MagmaAdapterLayer, hidden: torch.Tensor, name: str = "default") -> torch.Tensor:
    """up(relu(down(x))) written out from the raw weights."""
    if name in layer.magma_norm:
        norm = layer.magma_norm[name]
        hidden = F.layer_norm(hidden, (hidden.shape[-1],), norm.weight, norm.bias, norm.eps)
    down, up = layer.magma_down[name], layer.magma_up[name]
    return F.linear(torch.relu(F.linear(hidden, down.weight, down.bias)), up.weight, up.bias)


@pytest.mark.parametrize("location", ["mlp", "attention"])
@pytest.mark.parametrize("adapter_type", ["normal", "parallel", "scaled_parallel"])
@pytest.mark.parametrize("add_layernorm", [False, True])
def test_each_adapter_type_matches_its_formula(location, adapter_type, add_layernorm):
    settings = {"adapter_type": adapter_type, "downsample_factor": 8, "add_layernorm": add_layernorm}
    model = inject_adapter_in_model(MagmaAdapterConfig.from_magma_adapter_config({location: settings}), gptj())
    perturb_adapters(model)
    block = model.transformer.h[0]
    layer = block.mlp if location == "mlp" else block.attn
    assert layer.magma_down["default"].out_features == 64 // 8
    if adapter_type == "scaled_parallel":
        with torch.no_grad():
            layer.magma_scale["default"].fill_(0.37)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(7))
    if location == "mlp":
        output, base_output = layer(x), layer.base_layer(x)
    else:
        position_ids = torch.arange(5)[None]
        rotary = model.transformer.rotary_emb(x, position_ids=position_ids)
        output = layer(hidden_states=x, position_embeddings=rotary)[0]
        base_output = layer.base_layer(hidden_states=x, position_embeddings=rotary)[0]
    if adapter_type == "normal":
        expected = base_output + bottleneck(layer, base_output)
    else:
        scale = 0.37 if adapter_type == "scaled_parallel" else 1.0
        expected = base_output + scale * bottleneck(layer, x)
    torch.testing.assert_close(output, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(output, base_output)


def test_initialisation_is_the_originals():
    model = inject_adapter_in_model(
        MagmaAdapterConfig.from_magma_adapter_config(
            {"mlp": {"adapter_type": "scaled_parallel", "downsample_factor": 1, "add_layernorm": True}}
        ),
        GPTJForCausalLM(GPTJConfig(n_embd=256, n_layer=1, n_head=4, rotary_dim=8, vocab_size=10, n_positions=8)),
    )
    layer = model.transformer.h[0].mlp
    weights = torch.cat([layer.magma_down["default"].weight.flatten(), layer.magma_up["default"].weight.flatten()])
    biases = torch.cat([layer.magma_down["default"].bias, layer.magma_up["default"].bias])
    for values in (weights, biases):
        assert values.abs().max() <= 2e-3 + 1e-9  # clamped to +-2 std ...
        assert abs(values.mean()) < 2e-4
    assert 0.8e-3 < weights.std() < 1.0e-3  # ... of a normal with std 1e-3
    assert (weights.abs() == torch.tensor(2e-3)).sum() > 0.02 * weights.numel()  # clamped, not truncated
    assert torch.equal(layer.magma_norm["default"].weight, torch.ones(256))
    assert torch.equal(layer.magma_norm["default"].bias, torch.zeros(256))
    assert torch.equal(layer.magma_scale["default"], torch.ones(1))


def test_adapter_config_validation_and_json_round_trip(tmp_path):
    with pytest.raises(ValueError, match="needs an adapter"):
        MagmaAdapterConfig(mlp=None, attention=None)
    config = MagmaAdapterConfig.from_magma_adapter_config(V2_LIKE, task_type="CAUSAL_LM")
    assert sorted(config.target_modules) == ["attn", "mlp"]
    config.save_pretrained(tmp_path)
    loaded = MagmaAdapterConfig.from_pretrained(tmp_path)
    assert loaded.mlp == config.mlp and loaded.attention == config.attention
    assert copy.deepcopy(loaded).peft_type.value == "MAGMA"
