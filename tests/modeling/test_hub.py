"""Auto classes, the saved folder as a Hub repo, trust_remote_code without the package, the pipeline, PEFT export."""

import json
import os
import textwrap

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    GPTJForCausalLM,
    pipeline,
)

from magma_hf import (
    MagmaConfig,
    MagmaForConditionalGeneration,
    MagmaImageProcessor,
    MagmaImageProcessorTorchvision,
    MagmaImageToTextPipeline,
    MagmaModel,
    MagmaProcessor,
    MagmaVisionConfig,
)
from magma_hf.training.export import save_peft_adapter
from magma_hf.weights_magma import gptj_name
from tests.helpers import GREEDY, greedy_texts, random_image, run_without_magma_hf, save_tiny_magma


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer, processor):
    path = tmp_path_factory.mktemp("hub_repo")
    return path, save_tiny_magma(path, tokenizer, processor, magma_generation_defaults=True)


def test_auto_classes_resolve_with_the_package_imported(saved):
    path, _ = saved
    assert isinstance(AutoConfig.from_pretrained(path), MagmaConfig)
    assert type(AutoModel.from_pretrained(path)) is MagmaModel
    assert type(AutoModelForImageTextToText.from_pretrained(path)) is MagmaForConditionalGeneration
    assert type(AutoProcessor.from_pretrained(path)) is MagmaProcessor
    assert type(AutoImageProcessor.from_pretrained(path)) is MagmaImageProcessorTorchvision  # transformers' default
    assert type(AutoImageProcessor.from_pretrained(path, backend="pil")) is MagmaImageProcessor


def test_saved_folder_is_a_hub_repo(saved):
    path, _ = saved
    names = set(os.listdir(path))
    modules = (
        "configuration",
        "modeling",
        "adapters",
        "processing",
        "image_processing",
        "resampling",
        "pipeline",
        "hub",
        "weights",
    )
    for module in modules:
        assert f"{module}_magma.py" in names
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in names)
    config = json.loads((path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_magma.MagmaConfig",
        "AutoModel": "modeling_magma.MagmaModel",
        "AutoModelForImageTextToText": "modeling_magma.MagmaForConditionalGeneration",
    }
    assert config["custom_pipelines"]["image-to-text"]["impl"] == "pipeline_magma.MagmaImageToTextPipeline"
    processor_config = json.loads((path / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_magma.MagmaProcessor"
    card = (path / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "image-text-to-text"
    generation = json.loads((path / "generation_config.json").read_text())
    assert (generation["temperature"], generation["top_p"], generation["do_sample"]) == (0.7, 0.9, True)


def test_the_model_card_names_transformers_5s_task_and_parses_as_hub_metadata(saved):
    """The Hub reads `pipeline_tag` to pick the widget and `pipeline(model=repo)` the task: transformers 5 names the
    task `image-text-to-text` (`image-to-text` is only redirected there)."""
    from huggingface_hub import ModelCard, ModelCardData
    from transformers.pipelines import check_task

    path, _ = saved
    card = ModelCard.load(path / "README.md", ignore_metadata_errors=False)
    data = card.data
    assert isinstance(data, ModelCardData)
    assert data.pipeline_tag == "image-text-to-text" and check_task(data.pipeline_tag)[0] == data.pipeline_tag
    assert data.library_name == "transformers" and data.license == "mit"
    assert data.base_model == ["EleutherAI/gpt-j-6b", "timm/resnet50x16_clip.openai"]  # GPT-J, CLIP RN50x16
    assert "image-text-to-text" in data.tags and "custom_code" in data.tags
    assert ModelCardData(**data.to_dict()).to_dict() == data.to_dict()  # well-formed metadata, nothing dropped
    assert 'pipeline("image-text-to-text"' in card.text and 'pipeline("image-to-text"' not in card.text


def test_saving_keeps_an_existing_model_card(saved, tmp_path):
    _, model = saved
    (tmp_path / "README.md").write_text("my own card")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "my own card"


# `auto_map` names a saved folder's code: saving writes it into the files and leaves the live object as it was, and
# loading (where `import magma_hf` registered MAGMA) drops it, so that every round trip gives back an equal object.


def contents(loaded) -> dict:
    """`to_dict()` without `_name_or_path`, where `AutoConfig` records the folder it read."""
    return {key: value for key, value in loaded.to_dict().items() if key != "_name_or_path"}


def round_trips(load_functions, folder, before: dict, again) -> None:
    """Each loader gives `before` back from `folder`, and what it loaded saves and reloads to `before` again."""
    for load in load_functions:
        loaded = load(folder)
        assert contents(loaded) == before, load
        loaded.save_pretrained(again)
        assert contents(loaded) == before, load
        assert contents(load(again)) == before, load


def test_a_config_round_trips_to_an_equal_dict_through_every_entry_point(config, saved, tmp_path):
    before = contents(config)
    config.save_pretrained(tmp_path / "config")
    config.save_pretrained(tmp_path / "nested" / "sub")
    assert contents(config) == before
    assert json.loads((tmp_path / "config" / "config.json").read_text())["auto_map"]  # the files name the code
    loaders = (MagmaConfig.from_pretrained, AutoConfig.from_pretrained)
    round_trips(loaders, tmp_path / "config", before, tmp_path / "again")
    assert contents(MagmaConfig.from_pretrained(tmp_path / "nested", subfolder="sub")) == before
    assert contents(AutoConfig.from_pretrained(tmp_path / "nested", subfolder="sub")) == before
    # the vision config saved alone, and the config of a whole saved model
    vision_before = config.vision_config.to_dict()
    config.vision_config.save_pretrained(tmp_path / "vision")
    assert MagmaVisionConfig.from_pretrained(tmp_path / "vision").to_dict() == vision_before
    model_config = contents(MagmaConfig.from_pretrained(saved[0]))
    assert "auto_map" not in model_config and contents(AutoConfig.from_pretrained(saved[0])) == model_config
    round_trips(loaders, saved[0], model_config, tmp_path / "model_again")


def test_an_image_processor_round_trips_to_an_equal_dict_through_every_entry_point(processor, tmp_path):
    image_processor = MagmaImageProcessor(image_size=64)
    before = image_processor.to_dict()
    image_processor.save_pretrained(tmp_path / "alone")
    assert image_processor.to_dict() == before
    assert json.loads((tmp_path / "alone" / "preprocessor_config.json").read_text())["auto_map"]
    loaders = (MagmaImageProcessor.from_pretrained, AutoImageProcessor.from_pretrained)
    round_trips(loaders, tmp_path / "alone", before, tmp_path / "again")
    # saved within a processor (nested in processor_config.json), and as the processor holds it
    processor.save_pretrained(tmp_path / "processor")
    assert processor.image_processor.to_dict() == before
    round_trips(loaders, tmp_path / "processor", before, tmp_path / "again_from_processor")
    assert MagmaProcessor.from_pretrained(tmp_path / "processor").image_processor.to_dict() == before
    torchvision = MagmaImageProcessorTorchvision(image_size=64)
    torchvision_before = torchvision.to_dict()
    torchvision.save_pretrained(tmp_path / "torchvision")
    assert torchvision.to_dict() == torchvision_before
    round_trips(
        [MagmaImageProcessorTorchvision.from_pretrained],
        tmp_path / "torchvision",
        torchvision_before,
        tmp_path / "torchvision_again",
    )


def test_a_processor_round_trips_to_an_equal_dict_through_every_entry_point(processor, tmp_path):
    before = processor.to_dict()
    processor.save_pretrained(tmp_path / "processor")
    assert processor.to_dict() == before
    round_trips(
        (MagmaProcessor.from_pretrained, AutoProcessor.from_pretrained),
        tmp_path / "processor",
        before,
        tmp_path / "again",
    )
    # built from its parts, each loaded through its own Auto class, it equals the processor loaded whole
    parts = {
        "image_processor": AutoImageProcessor.from_pretrained(tmp_path / "processor"),
        "tokenizer": AutoTokenizer.from_pretrained(tmp_path / "processor"),
    }
    assert MagmaProcessor(**parts).to_dict() == MagmaProcessor.from_pretrained(tmp_path / "processor").to_dict()
    assert MagmaProcessor(**parts).to_dict() == before


REMOTE_SCRIPT = textwrap.dedent(
    """
    import json
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, pipeline

    path = sys.argv[1]
    image = Image.open(sys.argv[2])
    greedy = {"do_sample": False, "max_new_tokens": 6}
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    inputs = processor(images=[image], text=["a photo of"], return_tensors="pt")
    generated = model.generate(**inputs, **greedy)[:, inputs.input_ids.shape[1]:]
    pipe = pipeline("image-to-text", model=path, trust_remote_code=True)
    card_pipe = pipeline("image-text-to-text", model=path, trust_remote_code=True)  # as the model card shows it
    image_processors = {
        str(backend): type(AutoImageProcessor.from_pretrained(path, trust_remote_code=True, backend=backend)).__name__
        for backend in (None, "torchvision", "pil")
    }
    print(json.dumps({
        "card_caption": card_pipe(image, generate_kwargs=greedy),
        "model_module": type(model).__module__,
        "processor_class": type(processor).__name__,
        "image_processor_class": type(processor.image_processor).__name__,
        "image_processors": image_processors,
        "generate": processor.post_process_image_text_to_text(generated)[0],
        "caption": pipe(image, generate_kwargs=greedy),
        "answer": pipe(image, text="Q: What is in the picture? A:", generate_kwargs=greedy),
    }))
    """
)


def test_trust_remote_code_works_where_the_package_cannot_be_imported(saved, processor, tmp_path):
    path, model = saved
    image = random_image(21)
    image.save(tmp_path / "image.png")
    out = run_without_magma_hf(REMOTE_SCRIPT, str(path), str(tmp_path / "image.png"), cwd=tmp_path)
    assert out["model_module"].startswith("transformers_modules.") and out["processor_class"] == "MagmaProcessor"
    # the Hub code resolves backends as the package does: torchvision by default
    assert out["image_processor_class"] == "MagmaImageProcessorTorchvision"
    assert out["image_processors"] == {
        "None": "MagmaImageProcessorTorchvision",
        "torchvision": "MagmaImageProcessorTorchvision",
        "pil": "MagmaImageProcessor",
    }
    caption, photo_of, answer = greedy_texts(
        model, processor, image, ["", "a photo of", "Q: What is in the picture? A:"]
    )
    assert out["generate"] == photo_of
    assert [item["generated_text"] for item in out["caption"]] == [caption]
    assert [item["generated_text"] for item in out["card_caption"]] == [caption]
    assert [item["generated_text"] for item in out["answer"]] == [answer]
    assert len({caption, photo_of, answer}) > 1  # the prompts make a difference


def test_pipeline_in_process_captions_and_answers(saved, processor):
    path, model = saved
    image = random_image(22)
    pipe = pipeline("image-to-text", model=str(path), pipeline_class=MagmaImageToTextPipeline)
    caption, answer = greedy_texts(model, processor, image, ["", "Q: What is this? A:"])
    assert pipe(image, generate_kwargs=GREEDY) == [{"input_text": "", "generated_text": caption}]
    result = pipe(image, text="Q: What is this? A:", generate_kwargs=GREEDY)
    assert [item["generated_text"] for item in result] == [answer]
    full = pipe(image, text="Q: What is this? A:", generate_kwargs=GREEDY, return_full_text=True)
    assert full[0]["generated_text"] == "Q: What is this? A:" + answer
    batch = pipe([image, random_image(23)], generate_kwargs=GREEDY)
    assert len(batch) == 2 and batch[0]["generated_text"] == caption


def test_adapters_export_in_peft_format_for_a_stock_gptj(saved, tmp_path):
    _, model = saved
    stock = GPTJForCausalLM(model.config.text_config).eval()
    stock.load_state_dict({gptj_name(name): param for name, param in model.gptj_named_parameters()}, strict=True)
    save_peft_adapter(model, tmp_path, base_model_name_or_path="tiny-gptj")
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    adapted = PeftModel.from_pretrained(stock, tmp_path).eval()
    input_ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(adapted(input_ids=input_ids).logits, model(input_ids=input_ids).logits, rtol=0, atol=0)
    with adapted.disable_adapter():
        assert not torch.allclose(adapted(input_ids=input_ids).logits, model(input_ids=input_ids).logits)
    # from a given full state dict (as gathered from ZeRO-3 shards), the same export
    save_peft_adapter(model, tmp_path / "from_state_dict", state_dict=model.state_dict())
    exported = load_file(tmp_path / "adapter_model.safetensors")
    from_state_dict = load_file(tmp_path / "from_state_dict" / "adapter_model.safetensors")
    assert exported.keys() == from_state_dict.keys()
    assert all(torch.equal(exported[key], from_state_dict[key]) for key in exported)
