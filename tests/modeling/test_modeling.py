"""MagmaForConditionalGeneration: image encoding, embedding placement, loss, generation, attention, training policy."""

import pytest
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from transformers import AutoModel, AutoModelForImageTextToText

from magma_hf import MagmaForConditionalGeneration, MagmaModel
from magma_hf.generation import magma_generation_config
from tests.helpers import IMAGE, random_image, save_tiny_magma, tiny_config

N_TOKENS = 4  # tiny config: 64 px images, (64 / 32) ** 2 image tokens


def pixels(n: int, seed: int = 0, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def embeddings_by_hand(model, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """Token embeddings with each run of image tokens replaced by the next image's embeddings, in reading order."""
    embeds = model.model.language_model.wte(input_ids).clone()
    image_embeds = model.get_image_features(pixel_values).pooler_output.reshape(-1, embeds.shape[-1])
    positions = (input_ids == model.config.image_token_id).nonzero().tolist()
    for (row, col), vector in zip(positions, image_embeds, strict=True):
        embeds[row, col] = vector
    return embeds


def logits_by_hand(model, inputs_embeds: torch.Tensor, attention_mask=None) -> torch.Tensor:
    hidden = model.model.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
    return model.lm_head(hidden)


def test_image_encoder_is_the_resnet_trunk_flattened_row_major(model):
    encoder = model.model.vision_tower
    assert not hasattr(encoder, "attnpool")
    reference = ModifiedResNet(layers=[1, 1, 1, 1], output_dim=256, heads=4, image_size=64, width=8).eval()
    reference.load_state_dict(encoder.state_dict(), strict=False)
    images = pixels(3, size=96)  # a non-default size: 3x3 feature grid
    feature_map = reference.forward_intermediates(images, intermediates_only=True)["image_intermediates"][-1]
    features = encoder(images).last_hidden_state
    assert feature_map.shape == (3, 256, 3, 3) and features.shape == (3, 9, 256)
    for token in range(9):
        torch.testing.assert_close(features[:, token], feature_map[:, :, token // 3, token % 3])


def test_get_image_features_is_layernorm_of_the_projection(model):
    out = model.get_image_features(pixels(2))
    assert out.last_hidden_state.shape == (2, N_TOKENS, 256) and out.pooler_output.shape == (2, N_TOKENS, 64)
    projector = model.model.multi_modal_projector
    expected = F.layer_norm(
        F.linear(out.last_hidden_state, projector.proj.weight, projector.proj.bias),
        (64,),
        projector.ln.weight,
        projector.ln.bias,
    )
    torch.testing.assert_close(out.pooler_output, expected)


def test_images_replace_the_image_tokens_anywhere_and_in_any_number(model, tokenizer):
    image = [model.config.image_token_id] * N_TOKENS
    eos = tokenizer.eos_token_id
    rows = [
        text_ids(tokenizer, "a cat") + image + text_ids(tokenizer, " and") + image + text_ids(tokenizer, " a dog"),
        [eos] * 2 + image + text_ids(tokenizer, "a photo of a house"),
        text_ids(tokenizer, "no picture in this row at all"),
    ]
    width = max(map(len, rows))
    input_ids = torch.tensor([[eos] * (width - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    pixel_values = pixels(3)
    logits = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask).logits
    expected = logits_by_hand(model, embeddings_by_hand(model, input_ids, pixel_values), attention_mask)
    torch.testing.assert_close(logits, expected)
    # the images matter, and where they go matters
    assert not torch.allclose(logits, model(input_ids=input_ids, pixel_values=pixels(3, seed=1)).logits)


def test_image_token_count_must_match_the_images(model):
    input_ids = torch.tensor([[model.config.image_token_id] * N_TOKENS + [5, 6]])
    with pytest.raises(ValueError, match=r"4 image tokens .* but 2 images give 8"):
        model(input_ids=input_ids, pixel_values=pixels(2))


def test_labels_give_the_causal_lm_loss(model, tokenizer):
    caption = text_ids(tokenizer, "a dog running on the beach") + [tokenizer.eos_token_id]
    input_ids = torch.tensor([[model.config.image_token_id] * N_TOKENS + caption])
    labels = input_ids.masked_fill(input_ids == model.config.image_token_id, -100)
    out = model(input_ids=input_ids, pixel_values=pixels(1), labels=labels)
    expected = F.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_generate_encodes_images_once_and_reuses_the_kv_cache(model, tokenizer):
    calls, lengths = [], []
    model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    model.model.language_model.register_forward_hook(
        lambda module, args, kwargs, out: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    prompt = torch.tensor([[model.config.image_token_id] * N_TOKENS + text_ids(tokenizer, "a photo of")])
    pixel_values = pixels(1)
    generated = model.generate(input_ids=prompt, pixel_values=pixel_values, max_new_tokens=6, do_sample=False)
    assert len(calls) == 1
    assert lengths == [prompt.shape[1]] + [1] * 5  # prefill, then one token at a time from the cache
    sequence = prompt
    for _ in range(6):  # greedy by hand: full forward over images + text at every step
        next_token = model(input_ids=sequence, pixel_values=pixel_values).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(generated, sequence)


def test_batched_left_padded_generation_equals_each_sample_alone(model, processor):
    images = [random_image(1), random_image(2)]
    texts = ["a photo of", "Q: What is in the picture? A:"]
    batch = processor(images=images, text=texts, return_tensors="pt", padding=True)
    assert batch.attention_mask[0, 0] == 0  # the shorter prompt is padded on the left
    batched = model.generate(**batch, max_new_tokens=8, do_sample=False)[:, batch.input_ids.shape[1] :]
    for row, (image, text) in enumerate(zip(images, texts)):
        single = processor(images=[image], text=[text], return_tensors="pt")
        alone = model.generate(**single, max_new_tokens=8, do_sample=False)[:, single.input_ids.shape[1] :]
        assert torch.equal(batched[row], alone[0])


def test_sampling_follows_temperature_top_k_and_top_p(model, processor):
    inputs = processor(images=[random_image(3)], text=["a"], return_tensors="pt")
    defaults = magma_generation_config(model.config)  # what the folders the project writes carry
    assert (defaults.do_sample, defaults.temperature, defaults.top_p, defaults.top_k) == (True, 0.7, 0.9, 0)
    model.generation_config = defaults
    greedy = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    # top-k 1 and a vanishing nucleus leave only the argmax to sample
    assert torch.equal(model.generate(**inputs, max_new_tokens=8, do_sample=True, top_k=1), greedy)
    assert torch.equal(model.generate(**inputs, max_new_tokens=8, do_sample=True, top_p=1e-6, top_k=0), greedy)
    torch.manual_seed(0)
    first = model.generate(**inputs, max_new_tokens=8, temperature=5.0)
    torch.manual_seed(0)
    assert torch.equal(model.generate(**inputs, max_new_tokens=8, temperature=5.0), first)
    samples = {tuple(model.generate(**inputs, max_new_tokens=8, temperature=5.0)[0].tolist()) for _ in range(4)}
    assert len(samples) > 1  # a hot temperature over a random model gives different continuations


def test_beam_search_scores_are_the_sequences_log_probabilities(model, processor):
    inputs = processor(images=[random_image(4)], text=["a photo of"], return_tensors="pt")
    out = model.generate(
        **inputs,
        max_new_tokens=5,
        do_sample=False,
        num_beams=3,
        num_return_sequences=3,
        length_penalty=0.0,
        return_dict_in_generate=True,
        output_scores=True,
    )
    prompt_length = inputs.input_ids.shape[1]
    assert out.sequences.shape == (3, prompt_length + 5)
    assert torch.equal(out.sequences[:, :prompt_length], inputs.input_ids.expand(3, -1))
    assert len({tuple(row.tolist()) for row in out.sequences}) == 3
    log_probs = model(input_ids=out.sequences, pixel_values=inputs.pixel_values.expand(3, -1, -1, -1)).logits
    log_probs = log_probs.log_softmax(-1)[:, prompt_length - 1 : -1]
    sequence_scores = log_probs.gather(-1, out.sequences[:, prompt_length:, None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(out.sequences_scores, sequence_scores, rtol=1e-4, atol=1e-4)
    assert torch.all(out.sequences_scores[:-1] >= out.sequences_scores[1:])


@pytest.fixture(scope="module")
def saved_model_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    model = MagmaForConditionalGeneration(tiny_config(tokenizer))
    with torch.no_grad():  # make the adapters and the LM head bias matter
        for name, param in model.named_parameters():
            if ".magma_" in name or name == "lm_head.bias":
                param.add_(torch.randn_like(param) * 0.1)
    path = tmp_path_factory.mktemp("tiny_magma")
    model.save_pretrained(path)
    return path


def batch_with_padding(processor):
    return processor(
        images=[[random_image(5)], [random_image(6), random_image(7)]],
        text=["a cat on a sofa", f"{IMAGE} two images {IMAGE}"],
        return_tensors="pt",
        padding=True,
    )


def test_save_and_load_round_trip_gives_identical_logits(saved_model_dir, processor):
    inputs = batch_with_padding(processor)
    first = MagmaForConditionalGeneration.from_pretrained(saved_model_dir)
    second = AutoModelForImageTextToText.from_pretrained(saved_model_dir)
    assert type(second) is MagmaForConditionalGeneration
    torch.testing.assert_close(first(**inputs).logits, second(**inputs).logits, rtol=0, atol=0)
    base = AutoModel.from_pretrained(saved_model_dir)
    assert type(base) is MagmaModel
    torch.testing.assert_close(first.lm_head(base(**inputs).last_hidden_state), first(**inputs).logits, rtol=0, atol=0)


def test_eager_and_sdpa_attention_agree(saved_model_dir, processor):
    inputs = batch_with_padding(processor)
    eager = MagmaForConditionalGeneration.from_pretrained(saved_model_dir, attn_implementation="eager")
    sdpa = MagmaForConditionalGeneration.from_pretrained(saved_model_dir, attn_implementation="sdpa")
    assert eager.config.text_config._attn_implementation == "eager"
    assert sdpa.config.text_config._attn_implementation == "sdpa"
    mask = inputs.attention_mask.bool()
    difference = (eager(**inputs).logits - sdpa(**inputs).logits)[mask].abs().max()
    assert difference <= 1e-5


def test_bfloat16_loads_and_runs_on_cpu(saved_model_dir, processor):
    model = MagmaForConditionalGeneration.from_pretrained(saved_model_dir, dtype=torch.bfloat16)
    assert {param.dtype for param in model.parameters()} == {torch.bfloat16}
    inputs = processor(images=[random_image(8)], text=["a photo of"], return_tensors="pt")
    logits = model(**inputs).logits
    reference = MagmaForConditionalGeneration.from_pretrained(saved_model_dir)(**inputs).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert (logits.float() - reference).abs().max() < 0.1
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, inputs.input_ids.shape[1] + 4)


@pytest.mark.parametrize("adapter_type", ["normal", "parallel", "scaled_parallel"])
def test_generation_offloaded_to_disk_equals_generation_in_memory(tokenizer, processor, tmp_path, adapter_type):
    """`device_map="auto"` with less memory than the model needs puts the GPT-J blocks, adapters included, on disk;
    accelerate's hooks load a module's weights at its forward. The CPU equivalent of transformers' offload tests
    (which need an accelerator); on main `scaled_parallel` failed with a meta tensor at the adapter's scale."""
    adapter = {"adapter_type": adapter_type, "downsample_factor": 4}
    config = tiny_config(tokenizer, adapter_config={"mlp": adapter, "attention": adapter})
    model = save_tiny_magma(tmp_path / "model", tokenizer, processor, config=config)  # adapters (and scales) not 1
    budget = int(0.9 * model.get_memory_footprint())
    offloaded = MagmaForConditionalGeneration.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": budget}, offload_folder=tmp_path / "offload"
    )
    on_disk = [name for name, where in offloaded.hf_device_map.items() if where == "disk"]
    assert "cpu" in offloaded.hf_device_map.values() and "model.language_model.h" in on_disk
    inputs = batch_with_padding(processor)
    settings = {"max_new_tokens": 4, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        expected = model.generate(**inputs, **settings)
        generated = offloaded.generate(**inputs, **settings)
    torch.testing.assert_close(generated.sequences, expected.sequences, rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(generated.logits), torch.stack(expected.logits))


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer, processor):
    torch.manual_seed(0)
    model = MagmaForConditionalGeneration(tiny_config(tokenizer, image_embed_dropout_prob=0.0))
    inputs = processor(
        images=[random_image(9), random_image(10)],
        text=["a cat", "a dog on a beach"],
        return_tensors="pt",
        padding=True,
    )
    labels = inputs.input_ids.masked_fill(inputs.attention_mask == 0, -100)

    def adapter_gradients():
        model.zero_grad()
        model(**inputs, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}

    model.train()
    plain = adapter_gradients()
    block_calls = []
    model.model.language_model.h[0].ln_1.register_forward_hook(lambda *args: block_calls.append(1))
    model.gradient_checkpointing_enable()
    checkpointed = adapter_gradients()
    assert len(block_calls) == 2  # the block ran again in the backward pass: activations were recomputed
    assert plain.keys() == checkpointed.keys() and any(".magma_down." in name for name in plain)
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("enable", "settings"),
    [
        ("activation_checkpointing_enable", {}),
        ("gradient_checkpointing_enable", {}),
        ("gradient_checkpointing_enable", {"gradient_checkpointing_kwargs": {"use_reentrant": True}}),
    ],
    ids=["activation_checkpointing", "gradient_checkpointing", "reentrant"],
)
def test_gradient_checkpointing_covers_the_image_encoder(tokenizer, processor, enable, settings):
    """MAGMA trains the image encoder: its residual blocks are recomputed in the backward pass too, with the gradients
    and the BatchNorm statistics of a step without checkpointing (the replay must not update them a second time)."""
    torch.manual_seed(0)
    model = MagmaForConditionalGeneration(tiny_config(tokenizer, image_embed_dropout_prob=0.0)).train()
    images, text = [random_image(9), random_image(10)], ["a cat", "a dog on a beach"]
    inputs = processor(images=images, text=text, return_tensors="pt", padding=True)
    labels = inputs.input_ids.masked_fill(inputs.attention_mask == 0, -100)
    encoder = model.vision_tower
    start = {name: tensor.clone() for name, tensor in encoder.state_dict().items()}

    def training_step() -> tuple[dict, dict]:
        encoder.load_state_dict(start)  # the same BatchNorm statistics before each step
        model.zero_grad()
        model(**inputs, labels=labels).loss.backward()
        gradients = {name: param.grad.clone() for name, param in encoder.named_parameters()}
        return gradients, {name: buffer.clone() for name, buffer in encoder.named_buffers()}

    plain_gradients, plain_buffers = training_step()
    block_runs = []
    encoder.layer1[0].conv1.register_forward_hook(lambda *args: block_runs.append(1))
    getattr(model, enable)(**settings)
    gradients, buffers = training_step()
    assert len(block_runs) == 2  # the block ran again in the backward pass: its activations were not kept
    assert gradients.keys() == plain_gradients.keys() and len(gradients) > 0
    for name in gradients:
        torch.testing.assert_close(gradients[name], plain_gradients[name], rtol=1e-5, atol=1e-7)
    assert not torch.equal(buffers["layer1.0.bn1.running_mean"], start["layer1.0.bn1.running_mean"])  # they moved
    for name in buffers:
        torch.testing.assert_close(buffers[name], plain_buffers[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("freeze_image_encoder", [False, True])
def test_training_policy_keeps_gptj_bitwise_unchanged(tokenizer, processor, freeze_image_encoder):
    torch.manual_seed(0)
    model = MagmaForConditionalGeneration(tiny_config(tokenizer, freeze_image_encoder=freeze_image_encoder))
    model.apply_training_policy()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    trainable = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    inputs = processor(images=[random_image(11)], text=["a cat"], return_tensors="pt")
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(**inputs, labels=inputs.input_ids).loss.backward()
        optimizer.step()
    after = model.state_dict()
    gptj_names = [name for name, _ in model.gptj_named_parameters()]
    assert "lm_head.weight" in gptj_names and "model.language_model.wte.weight" in gptj_names
    assert all(torch.equal(before[name], after[name]) for name in gptj_names)
    changed = {name for name in after if not torch.equal(before[name], after[name])}
    assert any(".magma_" in name for name in changed)
    assert any(name.startswith("model.multi_modal_projector.") for name in changed)
    encoder_changed = {name for name in changed if name.startswith("model.vision_tower.")}
    assert bool(encoder_changed) is not freeze_image_encoder  # frozen: not even BatchNorm statistics move


def test_a_loaded_model_is_all_trainable_until_the_policy_is_applied(saved_model_dir):
    model = MagmaForConditionalGeneration.from_pretrained(saved_model_dir)
    assert all(param.requires_grad for param in model.parameters())  # as any transformers model
    model.apply_training_policy()
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and not trainable & {name for name, _ in model.gptj_named_parameters()}
    assert any(name.startswith("model.vision_tower.") for name in trainable)


def test_dropout_only_in_training(model, processor):
    inputs = processor(images=[random_image(12)], text=["a"], return_tensors="pt")
    torch.testing.assert_close(model(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    model.train()
    assert not torch.allclose(model(**inputs).logits, model(**inputs).logits)
