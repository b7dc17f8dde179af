"""MAGMA against the contract transformers' own models keep: deprecated argument names, weight initialisation of
missing weights, the image-feature API and the common config attributes."""

import inspect
import json
from unittest.mock import patch

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, set_seed

from magma_hf import MagmaConfig, MagmaForConditionalGeneration, MagmaVisionConfig
from tests.helpers import random_image, tiny_config


@pytest.fixture
def inputs(processor):
    return processor(text="<|image|> a photo of", images=[random_image(0)], return_tensors="pt")


# 1. `past_key_values=`, the pre-5 name of `cache=`


def test_a_cache_passed_as_past_key_values_continues_like_cache(model, inputs, tokenizer):
    next_ids = torch.tensor([tokenizer.encode(" a cat")])
    mask = torch.ones(1, inputs["input_ids"].shape[1] + next_ids.shape[1], dtype=torch.long)
    with torch.no_grad():
        first = model(**inputs, use_cache=True)
        expected = model(input_ids=next_ids, attention_mask=mask, cache=first.cache).logits
        first = model(**inputs, use_cache=True)  # a fresh cache: the one above now holds the continuation too
        old_name = model(input_ids=next_ids, attention_mask=mask, past_key_values=first.cache).logits
        without_cache = model(input_ids=next_ids).logits
    assert not torch.allclose(without_cache, expected, atol=1e-4)  # the cache matters for these logits
    torch.testing.assert_close(old_name, expected)


def test_a_cache_beside_an_explicit_cache_none_is_refused(model, inputs):
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).cache
    for forward in (model, model.model):
        with pytest.raises(ValueError, match="Both `past_key_values` and `cache` are set"):
            forward(input_ids=inputs["input_ids"][:, -1:], cache=None, past_key_values=cache)


# 2. Missing weights are initialised as `__init__` initialises them


def seeded_initialisation():
    """Every module initialised from the same seed, so that `__init__` and `from_pretrained` can be compared exactly
    (transformers' own check of `_init_weights` does the same)."""
    original_initialize_weights = PreTrainedModel._initialize_weights

    def seeded_initialize_weights(self, module, is_custom_code=False):
        set_seed(0)
        original_initialize_weights(self, module, is_custom_code)

    return patch.object(PreTrainedModel, "_initialize_weights", seeded_initialize_weights)


def test_adapters_missing_from_the_checkpoint_are_initialised_as_in_init(tokenizer, tmp_path):
    """As transformers' own check: with the seed reset before each module's init, a model whose adapter weights are
    missing from its checkpoint gets exactly the adapter weights `__init__` gives."""
    config = tiny_config(
        tokenizer,
        adapter_config={
            "mlp": {"adapter_type": "scaled_parallel", "downsample_factor": 4, "add_layernorm": True},
            "attention": {"adapter_type": "normal", "downsample_factor": 8},
        },
    )
    with seeded_initialisation():
        built = MagmaForConditionalGeneration(config)
        built.save_pretrained(tmp_path)
        weights = load_file(tmp_path / "model.safetensors")
        save_file({k: v for k, v in weights.items() if ".magma_" not in k}, tmp_path / "model.safetensors")
        loaded = MagmaForConditionalGeneration.from_pretrained(tmp_path)
    adapter_weights = {name: p for name, p in built.named_parameters() if ".magma_" in name}
    assert len(adapter_weights) == 2 * (7 + 4)  # per block: mlp down, up, norm (2 each) and scale; attn down, up
    down = adapter_weights["model.language_model.h.0.mlp.magma_down.default.weight"]
    # MAGMA's init (normal(0, 1e-3) clamped), not GPT-J's normal(0, 0.02)
    assert float(down.detach().abs().max()) <= 2.001e-3
    loaded_parameters = dict(loaded.named_parameters())
    for name, expected in adapter_weights.items():
        torch.testing.assert_close(loaded_parameters[name], expected, rtol=0, atol=0, msg=name)


# 3. `get_image_features`: hidden states and tuples as transformers' models give them


def test_get_image_features_returns_the_encoder_stages_as_hidden_states(model, inputs):
    with torch.no_grad():
        plain = model.get_image_features(inputs["pixel_values"])
        outputs = model.get_image_features(inputs["pixel_values"], output_hidden_states=True)
    assert plain.hidden_states is None
    stages = outputs.hidden_states
    assert isinstance(stages, tuple) and len(stages) == 5  # the stem and the four stages
    assert [tuple(s.shape[1:]) for s in stages] == [(8, 16, 16), (32, 16, 16), (64, 8, 8), (128, 4, 4), (256, 2, 2)]
    torch.testing.assert_close(stages[-1].flatten(2).transpose(1, 2), outputs.last_hidden_state)
    torch.testing.assert_close(outputs.pooler_output, plain.pooler_output)


def test_get_image_features_follows_config_output_hidden_states(model, inputs):
    model.config.output_hidden_states = True
    with torch.no_grad():
        outputs = model.model.get_image_features(inputs["pixel_values"])
    assert isinstance(outputs.hidden_states, tuple) and len(outputs.hidden_states) == 5


def test_get_image_features_returns_a_tuple_without_return_dict(model, inputs):
    with torch.no_grad():
        outputs = model.get_image_features(inputs["pixel_values"])
        as_tuple = model.get_image_features(inputs["pixel_values"], return_dict=False)
        with_stages = model.get_image_features(inputs["pixel_values"], return_dict=False, output_hidden_states=True)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    torch.testing.assert_close(as_tuple[0], outputs.last_hidden_state)
    torch.testing.assert_close(as_tuple[1], outputs.pooler_output)
    assert isinstance(with_stages, tuple) and len(with_stages) == 3 and len(with_stages[2]) == 5


@pytest.mark.parametrize("where", ["model", "text_config"])
def test_forward_reads_its_parts_outputs_under_return_dict_false(model, inputs, where):
    with torch.no_grad():
        expected = model(**inputs).logits
        config = model.config if where == "model" else model.config.text_config
        config.return_dict = False
        outputs = model(**inputs)
    logits = outputs[0] if where == "model" else outputs.logits
    torch.testing.assert_close(logits, expected)


# 4. `vision_config.hidden_size`


def test_vision_config_hidden_size_is_the_encoder_feature_size(model, inputs):
    config = model.config.vision_config
    assert config.hidden_size == 256 == config.width * 32
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"]).last_hidden_state
    assert features.shape[-1] == config.hidden_size
    assert MagmaVisionConfig().hidden_size == 3072  # CLIP RN50x16


def test_a_config_json_without_hidden_size_loads_the_same_model(model, tmp_path):
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "hidden_size" not in saved["vision_config"]  # derived from width: serialized configs keep their meaning
    loaded = MagmaForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.config.vision_config.hidden_size == model.config.vision_config.hidden_size
    assert loaded.model.multi_modal_projector.proj.in_features == 256
    for (name, expected), (_, actual) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(actual, expected, msg=name)


def test_a_hidden_size_that_contradicts_width_is_refused():
    assert MagmaVisionConfig(width=8, hidden_size=256).hidden_size == 256
    with pytest.raises(ValueError, match=r"hidden_size 300 does not match width 8.*width \* 32 = 256"):
        MagmaVisionConfig(width=8, hidden_size=300)
    with pytest.raises(ValueError, match="hidden_size 100 does not match width 96"):
        MagmaConfig(vision_config={"hidden_size": 100})


def test_a_checkpoint_missing_every_weight_loads_as_init_builds(tokenizer, tmp_path):
    """The same check over the whole model: encoder, projection, GPT-J, adapters and buffers."""
    config = tiny_config(tokenizer)
    with seeded_initialisation():
        built = MagmaForConditionalGeneration(config)
        built.save_pretrained(tmp_path)
        save_file({"lm_head.bias": built.lm_head.bias.detach()}, tmp_path / "model.safetensors")
        loaded = MagmaForConditionalGeneration.from_pretrained(tmp_path)
    loaded_state = loaded.state_dict()
    different = [name for name, tensor in built.state_dict().items() if not torch.equal(tensor, loaded_state[name])]
    assert different == []


# 5. The vision tower is a PreTrainedModel under open_clip's names


def test_the_vision_tower_is_a_pretrained_model_with_open_clips_weight_names(model):
    from open_clip.modified_resnet import ModifiedResNet

    vision_config = model.config.vision_config
    assert isinstance(model.vision_tower, PreTrainedModel)
    assert model.vision_tower.config is vision_config
    trunk = ModifiedResNet(
        layers=vision_config.layers, output_dim=256, heads=4, image_size=vision_config.image_size, width=8
    )
    expected = ["model.vision_tower." + name for name in trunk.state_dict() if not name.startswith("attnpool.")]
    assert [name for name in model.state_dict() if name.startswith("model.vision_tower.")] == expected


def test_composite_dispatch_reaches_the_vision_tower(model, tokenizer):
    assert "Bottleneck" not in MagmaForConditionalGeneration._no_split_modules  # declared by the vision model only
    assert {"Bottleneck", "GPTJBlock"} <= model._no_split_modules  # collected from the submodels for device_map
    from magma_hf.modeling_magma import MagmaVisionPreTrainedModel

    initialised_by_the_vision_model = []
    vision_init = MagmaVisionPreTrainedModel._init_weights

    def recording_init(self, module):
        initialised_by_the_vision_model.append(module)
        vision_init(self, module)

    with patch.object(MagmaVisionPreTrainedModel, "_init_weights", recording_init):
        built = MagmaForConditionalGeneration(tiny_config(tokenizer))
    assert any(module is built.vision_tower.conv1 for module in initialised_by_the_vision_model)
    assert not any(module is built.lm_head for module in initialised_by_the_vision_model)
    for implementation in ("eager", "sdpa"):
        built.set_attn_implementation(implementation)  # reaches every submodel, the vision model included
        assert built.vision_tower.config._attn_implementation == implementation
        assert built.language_model.config._attn_implementation == implementation


def test_a_folder_saved_before_the_vision_model_loads_identically(model, tmp_path):
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert "model.vision_tower.conv1.weight" in saved and "model.vision_tower.layer4.0.conv1.weight" in saved
    loaded = MagmaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0, msg=name)


# 6. A tensor-parallel plan under MAGMA's names


@pytest.mark.parametrize("locations", [("mlp",), ("mlp", "attention")])
def test_the_tensor_parallel_plan_covers_every_gptj_linear_under_magmas_names(tokenizer, locations):
    from transformers.distributed.parallel_utils import _get_parameter_plan, replace_layer_number_by_wildcard

    config = tiny_config(tokenizer, adapter_config={location: {"adapter_type": "normal"} for location in locations})
    model = MagmaForConditionalGeneration(config)
    plan = model.tp_plan
    names = {replace_layer_number_by_wildcard(n) for n, _ in [*model.named_modules(), *model.named_parameters()]}
    assert sorted(set(plan) - names) == []  # every rule names a module of this model
    styles = {name: _get_parameter_plan(name, plan) for name, _ in model.named_parameters()}
    gptj_linears = [
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".magma_" not in name and not name.startswith("model.multi_modal")
    ]
    assert len(gptj_linears) == 2 * 6 + 1  # q, k, v, out, fc_in, fc_out per block; the LM head
    assert all(styles[name] in ("colwise", "rowwise", "colwise_gather_output") for name in gptj_linears)
    assert styles["model.language_model.wte.weight"] == "embedding_rowwise"
    wrapped = "model.language_model.h.1.attn.base_layer.q_proj.weight"
    assert (wrapped in styles) is ("attention" in locations) and styles.get(wrapped, "colwise") == "colwise"
    adapter_weights = [name for name in styles if ".magma_" in name]
    assert adapter_weights and all(styles[name] == "replicate" for name in adapter_weights)


# Compilation: static cache, torch.compile, no host sync in the placeholder check


def test_kwargs_are_typed_as_transformers_kwargs():
    from typing import get_args

    from transformers.utils import TransformersKwargs

    for forward in (MagmaForConditionalGeneration.forward, MagmaForConditionalGeneration.get_image_features):
        annotation = inspect.signature(forward).parameters["kwargs"].annotation
        assert get_args(annotation) == (TransformersKwargs,), forward


def test_static_cache_generation_gives_the_dynamic_caches_tokens(model, inputs):
    settings = {"max_new_tokens": 5, "do_sample": False}
    with torch.no_grad():
        dynamic = model.generate(**inputs, **settings)
        static = model.generate(**inputs, **settings, cache_implementation="static")
    torch.testing.assert_close(static, dynamic, rtol=0, atol=0)


def test_compiled_generation_gives_the_eager_tokens(model, inputs):
    from transformers import CompileConfig

    assert MagmaForConditionalGeneration._can_compile_fullgraph
    settings = {"max_new_tokens": 4, "do_sample": False, "cache_implementation": "static"}
    # fullgraph: a graph break (such as reading a token count on the host) fails the compilation. Dynamo's "eager"
    # backend traces exactly as inductor would, without inductor's code generation (seconds, not minutes, on CPU).
    compile_config = CompileConfig(fullgraph=True, dynamic=False, backend="eager")
    compile_config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    with torch.no_grad():
        eager = model.generate(**inputs, **settings, disable_compile=True)
        compiled = model.generate(**inputs, **settings, compile_config=compile_config)
    assert counters["stats"]["unique_graphs"] >= 1  # the decoding steps did run compiled
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


# The training policy is applied explicitly, not by building or loading


def test_a_built_model_is_all_trainable_as_any_transformers_model(model):
    assert [name for name, param in model.named_parameters() if not param.requires_grad] == []
    model.apply_training_policy()
    assert not any(param.requires_grad for _, param in model.gptj_named_parameters())


def test_a_forward_with_images_compiles_as_one_graph(model, inputs):
    """The image-token count is checked on the device (`torch_compilable_check`, as LLaVA): reading it on the host
    (`int(mask.sum())`) is data-dependent control flow that a full-graph compilation refuses."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs).logits, model(**inputs).logits)


# 5. Every `output_*` flag of `generate` gives its tensors at every step, in the shapes transformers' generation tests
# check (tests/generation/test_utils.py `_check_generate_outputs`)

NEW_TOKENS = 3
GENERATION_MODES = {
    "greedy": {"do_sample": False},
    "sample": {"do_sample": True, "top_k": 10},
    "beam": {"do_sample": False, "num_beams": 2, "num_return_sequences": 2},
    "beam_sample": {"do_sample": True, "num_beams": 2},
    "assisted": {"do_sample": False},  # the model as its own assistant, one prompt (assisted decoding's limit)
    "prompt_lookup": {"do_sample": False, "prompt_lookup_num_tokens": 2},
    "compiled": {"do_sample": False, "cache_implementation": "static"},
}


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text_only"])
@pytest.mark.parametrize("mode", list(GENERATION_MODES))
def test_every_output_flag_of_generate_gives_its_tensors_at_every_step(model, processor, mode, with_image):
    """`generate`'s `get_image_features` call at prefill must not take the `output_*` flags the decoding steps need
    (on main `output_hidden_states=True` gave `hidden_states=(None, ...)` and assisted decoding a TypeError)."""
    from transformers import CompileConfig

    model.set_attn_implementation("eager")  # sdpa returns no attentions
    batch_size = 1 if mode in ("assisted", "prompt_lookup") else 2
    texts = ["<|image|> a photo of", "<|image|> a dog running on the"][:batch_size]
    if with_image:
        inputs = processor(text=texts, images=[[random_image(i)] for i in range(batch_size)], padding=True)
    else:
        inputs = processor(text=[text.removeprefix("<|image|>") for text in texts], padding=True)
    inputs = inputs.convert_to_tensors("pt")
    settings = dict(GENERATION_MODES[mode])
    if mode == "assisted":
        settings["assistant_model"] = model
    if mode == "compiled":
        torch._dynamo.reset()
        settings["compile_config"] = CompileConfig(fullgraph=True, dynamic=False, backend="eager")
        settings["compile_config"]._compile_all_devices = True
    flags = {f"output_{name}": True for name in ("hidden_states", "attentions", "scores", "logits")}
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            **settings,
            **flags,
            return_dict_in_generate=True,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
        )

    text_config = model.config.text_config
    prompt_length = inputs["input_ids"].shape[1]
    assert out.sequences.shape[1] == prompt_length + NEW_TOKENS
    rows = batch_size * settings.get("num_beams", 1)  # the batch the decoding steps ran on
    assert len(out.scores) == len(out.logits) == len(out.hidden_states) == len(out.attentions) == NEW_TOKENS
    assert [tuple(step.shape) for step in out.scores] == [(rows, text_config.vocab_size)] * NEW_TOKENS
    assert [tuple(step.shape) for step in out.logits] == [(rows, text_config.vocab_size)] * NEW_TOKENS
    static_length = out.cache.get_max_length() if mode == "compiled" else None
    for step, (hidden_states, attentions) in enumerate(zip(out.hidden_states, out.attentions)):
        step_length = prompt_length if step == 0 else 1  # the prompt at prefill, then one token from the cache
        assert isinstance(hidden_states, tuple) and len(hidden_states) == text_config.n_layer + 1
        assert {tuple(layer.shape) for layer in hidden_states} == {(rows, step_length, text_config.n_embd)}
        assert isinstance(attentions, tuple) and len(attentions) == text_config.n_layer
        key_length = static_length or prompt_length + step
        assert {tuple(layer.shape) for layer in attentions} == {(rows, text_config.n_head, step_length, key_length)}
    # The prefill's hidden states are those of a forward on the prompt: the image embeddings did reach them
    with torch.no_grad():
        prompt_rows = {key: value.repeat_interleave(rows // batch_size, 0) for key, value in inputs.items()}
        expected = model(**prompt_rows, output_hidden_states=True).hidden_states
    real = prompt_rows["attention_mask"].bool()  # padding's hidden states depend on how the cache masks it
    torch.testing.assert_close(out.hidden_states[0][-1][real], expected[-1][real], rtol=1e-4, atol=1e-5)
