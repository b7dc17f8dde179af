"""The one generation and decoding path: evaluation, the demo and the trainer's logged captions answer alike."""

import pytest
import torch
from transformers import GPTJForCausalLM, LogitsProcessor, LogitsProcessorList, TrainingArguments

from magma_hf import demo
from magma_hf.evaluation.run import _Generator
from magma_hf.generation import answer_text, generate_answers
from magma_hf.training.trainer import MagmaTrainer
from tests.helpers import random_image


class ForceText(LogitsProcessor):
    """Makes the model generate exactly `ids` after the prompt, then end-of-text."""

    def __init__(self, ids: list[int], prompt_length: int, eos: int):
        self.ids, self.prompt_length, self.eos = ids, prompt_length, eos

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.ids[step] if step < len(self.ids) else self.eos] = 0.0
        return forced


def force_continuation(monkeypatch, model, tokenizer, text: str) -> None:
    """Every `model.generate` call (real generation) continues its prompt with `text`."""
    generate = model.generate
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    def forced_generate(*args, **kwargs):
        force = ForceText(ids, kwargs["input_ids"].shape[1], tokenizer.eos_token_id)
        return generate(*args, logits_processor=LogitsProcessorList([force]), **kwargs)

    monkeypatch.setattr(model, "generate", forced_generate)


def test_an_answer_is_the_first_line_and_a_leading_newline_is_no_answer():
    assert answer_text(" yes\nQ: what") == "yes"
    assert answer_text("  a cat  ") == "a cat"
    assert answer_text("\n yes") == ""  # "A:" then a newline: the example ended unanswered
    assert answer_text("") == ""


@pytest.mark.parametrize(("continuation", "answer"), [("\n yes", ""), (" a cat\nQ: what", "a cat")])
def test_evaluation_demo_and_trainer_captions_answer_alike(
    model, processor, monkeypatch, tmp_path, continuation, answer
):
    """The same continuation gives the same answer whoever asks (on main the demo said "yes" for "\\n yes", the
    trainer logged "\\n yes" verbatim, evaluation said "")."""
    force_continuation(monkeypatch, model, processor.tokenizer, continuation)
    images = [random_image(0), random_image(1)]
    shared = generate_answers(model, processor, ["", ""], images, max_new_tokens=6)
    assert shared == [answer, answer]
    assert _Generator(model, processor, 6)(["<|image|>Q: Is it red? A:"] * 2, [[image] for image in images]) == shared
    assert demo.generate_answers(model, processor, ["Q: Is it red? A:"] * 2, images, max_new_tokens=6) == shared
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = MagmaTrainer(model=model, args=args, processing_class=processor, caption_max_new_tokens=6)
    logged = trainer.log_generated_captions([{"image": image, "captions": ["a reference"]} for image in images])
    assert logged == shared
    assert (tmp_path / "eval_captions.jsonl").read_text().count(f'"generated": "{answer}"') == 2


def test_generation_stops_at_the_first_newline_and_restores_training_mode(model, processor, monkeypatch):
    text = " yes\n more text"
    force_continuation(monkeypatch, model, processor.tokenizer, text)
    lengths = []
    generate = model.generate

    def measured_generate(**kwargs):
        output = generate(**kwargs)
        lengths.append(output.shape[1] - kwargs["input_ids"].shape[1])
        return output

    monkeypatch.setattr(model, "generate", measured_generate)
    model.train()
    assert generate_answers(model, processor, ["Q: A:"], [random_image(0)], max_new_tokens=12) == ["yes"]
    assert model.training  # given back as it was
    up_to_newline = len(processor.tokenizer(" yes\n", add_special_tokens=False)["input_ids"])
    assert lengths == [up_to_newline] < [len(processor.tokenizer(text)["input_ids"])]


def test_text_alone_goes_through_a_plain_language_model(model, processor):
    """The demo's "what the language model knows" baseline: GPT-J alone, the same path, no images."""
    language_model = GPTJForCausalLM(model.config.text_config).eval()
    answers = generate_answers(language_model, processor, ["seven\nQ: Is it odd? A:", "two"], max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) and "\n" not in a for a in answers)


def test_blind_answers_do_not_depend_on_the_images(model, processor):
    images = [random_image(0), random_image(5)]
    blind = generate_answers(model, processor, ["", ""], images, max_new_tokens=4, blind=True)
    assert (
        blind[0]
        == blind[1]
        == generate_answers(model, processor, [""], [random_image(9)], max_new_tokens=4, blind=True)[0]
    )


def test_prompts_and_images_that_do_not_pair_up_are_named(model, processor):
    with pytest.raises(ValueError, match="3 prompts and 2 images"):
        generate_answers(model, processor, ["a", "b", "c"], [random_image(0)] * 2, max_new_tokens=2)
