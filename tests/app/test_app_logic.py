"""The app's logic without a browser: prompts, input checks, defaults, streaming and the stop button."""

import threading

import pytest

from magma_hf.app_magma import InputError, MagmaApp, Settings, build_query, default_settings
from magma_hf.evaluation.prompts import build_prompt
from magma_hf.generation import magma_generation_config


def test_query_is_the_harness_layout():
    examples = ["Q: What is it? A: a cat", "Q: How many? A: 2"]
    query = build_query(["q.png"], "Q: Is it red? A:", ["a.png", "b.png"], examples)
    expected = build_prompt("vqa", "Is it red?", [("What is it?", "a cat"), ("How many?", "2")])
    assert query.prompt == expected
    assert query.images == ["a.png", "b.png", "q.png"]  # in placeholder order: the examples' first
    assert build_query(["a.png", "b.png"], "").prompt == "<|image|><|image|>"  # no placeholders: images in front
    assert build_query([], "just text").prompt == "just text"


@pytest.mark.parametrize(
    "arguments, message",
    [
        (([], "  "), "Give an image"),
        ((["a.png"], "<|image|> and <|image|>"), "2 <|image|> placeholders and 1 image"),
        ((["a.png", "b.png", "c.png"], "<|image|> x <|image|>"), "Too many images: 3 images and 2"),
        ((["a.png"], "", ["b.png"], []), "1 image and 0 texts"),
        ((["a.png"] * 5, "", ["b.png"] * 4, ["x"] * 4), "9 images (5 for the prompt, 4 in examples): this app takes"),
        ((["a.png"], "", ["b.png"], ["<|image|> x"]), "example's text holds <|image|>"),
    ],
)
def test_bad_queries_are_named(arguments, message):
    with pytest.raises(InputError, match=message.replace("|", r"\|").replace("(", r"\(").replace(")", r"\)")):
        build_query(*arguments)


def test_defaults_are_the_generation_config(model):
    settings = default_settings(magma_generation_config(model.config))
    assert settings == Settings(do_sample=True, temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=100)


def test_stop_ends_generation_early(model, processor, tmp_path):
    from tests.helpers import random_image

    random_image(0).save(tmp_path / "a.png")
    app = MagmaApp(model, processor)
    query = build_query([str(tmp_path / "a.png")], "")
    stop = threading.Event()
    settings = Settings(False, 1.0, 1.0, 0, 200)
    model.generation_config.eos_token_id = None  # runs the whole budget unless stopped
    texts = app.stream(query, settings, stop)
    next(texts)
    stop.set()
    final = list(texts)[-1]
    ids = processor.tokenizer(final)["input_ids"]
    assert len(ids) < 100, "generation ran on after the stop"


def test_closing_the_stream_ends_the_generation_thread(model, processor, tmp_path):
    from tests.helpers import random_image

    random_image(0).save(tmp_path / "a.png")
    model.generation_config.eos_token_id = None
    texts = MagmaApp(model, processor).stream(build_query([str(tmp_path / "a.png")], ""), Settings(False, 1, 1, 0, 400))
    next(texts)
    texts.close()  # what the page going away does
    assert not any(thread.name == "magma-generate" for thread in threading.enumerate())


def test_answer_reports_errors_as_messages(model, processor, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"GIF89a broken")
    app = MagmaApp(model, processor)
    outputs = list(app.answer([(str(tmp_path / "broken.png"), None)], "", None, "", False, 1, 1, 0, 5))
    assert outputs == [("", "", outputs[0][2])]
    assert outputs[0][2].startswith("**Cannot run this:**") and "broken.png" in outputs[0][2]
    outputs = list(app.answer(None, "a prompt", None, "", False, 1, 1, 0, 0))
    assert "max new tokens must be at least 1" in outputs[-1][2]


def test_max_new_tokens_is_cut_to_the_room_the_prompt_leaves(model, processor):
    app = MagmaApp(model, processor)
    length = processor(text=["a photo of a cat"], return_tensors="pt")["input_ids"].shape[1]
    app.n_positions = length + 3
    *_, (answer, prompt, message) = app.answer(None, "a photo of a cat", None, "", False, 1, 1, 0, 20)
    assert message.startswith("Done after") and f"Max new tokens cut to 3: the prompt's {length} tokens" in message
    assert len(processor.tokenizer(answer)["input_ids"]) <= 3
    app.n_positions = length
    *_, (answer, prompt, message) = app.answer(None, "a photo of a cat", None, "", False, 1, 1, 0, 20)
    assert f"Text too long for the model: the prompt is {length} tokens" in message and answer == ""
