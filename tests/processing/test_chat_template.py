"""MAGMA's default chat template: a conversation written as MAGMA reads a prompt (each message's images first, then
its text; roles unmarked), saved with every processor and applied by transformers as vLLM applies it."""

from magma_hf import MagmaProcessor
from magma_hf.processing_magma import DEFAULT_CHAT_TEMPLATE
from tests.helpers import make_processor, random_image


def test_a_conversation_is_written_in_magmas_layout(processor):
    conversation = [
        {"role": "system", "content": "Captions:"},
        {"role": "user", "content": [
            {"type": "text", "text": " Q: What is it? A:"}, {"type": "image"}, {"type": "image_url", "image_url": "x"},
        ]},
        {"role": "assistant", "content": [{"type": "text", "text": " a cat\n"}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q: And this? A:"}]},
    ]  # fmt: skip
    text = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert text == "Captions:<|image|><|image|> Q: What is it? A: a cat\n<|image|>Q: And this? A:"


def test_the_template_is_saved_with_the_processor_and_gives_the_processors_inputs(tmp_path, tokenizer):
    processor = make_processor(tokenizer)
    assert processor.chat_template == DEFAULT_CHAT_TEMPLATE
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == DEFAULT_CHAT_TEMPLATE
    reloaded = MagmaProcessor.from_pretrained(tmp_path)
    image = random_image(0)
    conversation = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "A"}]}]
    inputs = reloaded.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")
    direct = processor(images=[image], text="A", return_tensors="pt")  # no <|image|>: the image goes in front
    assert inputs["input_ids"].tolist() == direct["input_ids"].tolist()
    assert (inputs["pixel_values"] == direct["pixel_values"]).all()


def test_a_processor_keeps_a_template_it_is_given(tokenizer):
    processor = MagmaProcessor(make_processor(tokenizer).image_processor, tokenizer, chat_template="{{ 'x' }}")
    assert processor.apply_chat_template([{"role": "user", "content": "y"}], tokenize=False) == "x"
