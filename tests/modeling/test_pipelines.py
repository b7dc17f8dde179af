"""The pipelines: `image-to-text` and `image-text-to-text` with `import magma_hf` (no trust_remote_code) and with
trust_remote_code where the package is missing; saving leaves the live model as it was; generation defaults live in
generation_config.json; what the shipped sampling defaults do compared with the original's."""

import json
import textwrap

import pytest
import torch
from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, pipeline
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.image_text_to_text import ImageTextToTextPipeline

from magma_hf import MagmaConfig, MagmaForConditionalGeneration, MagmaImageToTextPipeline, MagmaProcessor
from magma_hf.generation import MAGMA_GENERATION_DEFAULTS, magma_generation_config
from tests.helpers import (
    GREEDY,
    greedy_texts,
    make_tokenizer,
    random_image,
    run_without_magma_hf,
    save_tiny_magma,
)
from tests.original_magma import original_sampling_probs

TASKS = ("image-to-text", "image-text-to-text")
QUESTION = "Q: What is in the picture? A:"


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer, processor):
    path = tmp_path_factory.mktemp("magma_folder")
    return path, save_tiny_magma(path, tokenizer, processor)


@pytest.mark.parametrize("task", TASKS)
def test_both_tasks_caption_and_answer_without_trust_remote_code(saved, processor, task):
    path, model = saved
    image = random_image(31)
    pipe = pipeline(task, model=str(path))  # no trust_remote_code, no pipeline_class: `import magma_hf` is enough
    assert type(pipe) is MagmaImageToTextPipeline
    caption, answer = greedy_texts(model, processor, image, ["", QUESTION])
    assert [item["generated_text"] for item in pipe(image, generate_kwargs=GREEDY)] == [caption]
    assert [item["generated_text"] for item in pipe(image, text=QUESTION, generate_kwargs=GREEDY)] == [answer]
    assert caption != answer  # the prompt makes a difference


def test_a_plain_prompt_gets_no_advice_to_use_the_chat_format(saved):
    """MAGMA's prompt is plain text; its processor's chat template (for vLLM's chat endpoint) made transformers'
    pipeline advise the chat format "for better results" on every call."""
    from transformers.testing_utils import CaptureLogger

    from magma_hf.pipeline_magma import CHAT_FORMAT_HINT, stock_pipeline_logger

    path, _ = saved
    pipe = pipeline("image-text-to-text", model=str(path))
    assert pipe.processor.chat_template is not None
    stock_pipeline_logger.warning_once.cache_clear()  # shown at most once per process: not yet, for this test
    with CaptureLogger(stock_pipeline_logger) as captured:
        pipe(random_image(32), text=QUESTION, generate_kwargs={**GREEDY, "max_new_tokens": 2})
    assert CHAT_FORMAT_HINT not in captured.out
    assert stock_pipeline_logger.filters == []  # dropped for MAGMA's call only


def test_other_models_keep_transformers_own_pipeline(processor):
    """The registration replaces the task's class for the whole process: a model that is not MAGMA gets the stock
    class, and the task keeps its default model."""
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    sizes = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2}
    text_config = {"model_type": "llama", "vocab_size": len(tokenizer), **sizes}
    vision_config = {"model_type": "clip_vision_model", "image_size": 32, "patch_size": 16, **sizes}
    llava = LlavaForConditionalGeneration(
        LlavaConfig(text_config=text_config, vision_config=vision_config, image_token_id=len(tokenizer) - 1)
    )
    pipe = MagmaImageToTextPipeline(model=llava, processor=processor)
    assert type(pipe) is ImageTextToTextPipeline
    assert PIPELINE_REGISTRY.supported_tasks["image-text-to-text"]["default"]["model"]


def test_saved_folder_names_the_pipeline_under_both_tasks_and_reloads_without_it(saved):
    path, _ = saved
    custom = json.loads((path / "config.json").read_text())["custom_pipelines"]
    assert sorted(custom) == sorted(TASKS)
    assert {entry["impl"] for entry in custom.values()} == {"pipeline_magma.MagmaImageToTextPipeline"}
    # in-process the registered pipeline serves the tasks: a loaded config carrying the entry would make
    # transformers demand trust_remote_code
    assert not hasattr(MagmaConfig.from_pretrained(path), "custom_pipelines")


REMOTE_PIPELINES = textwrap.dedent(
    """
    import json
    from PIL import Image
    from transformers import pipeline

    path, image = sys.argv[1], Image.open(sys.argv[2])
    greedy = {"do_sample": False, "max_new_tokens": 6}
    out = {}
    for task in ("image-to-text", "image-text-to-text"):
        pipe = pipeline(task, model=path, trust_remote_code=True)
        out[task] = {
            "class": f"{type(pipe).__module__}.{type(pipe).__name__}",
            "caption": [item["generated_text"] for item in pipe(image, generate_kwargs=greedy)],
            "answer": [item["generated_text"] for item in pipe(image, text=sys.argv[3], generate_kwargs=greedy)],
        }
    print(json.dumps(out))
    """
)


def test_both_tasks_with_trust_remote_code_where_the_package_cannot_be_imported(saved, processor, tmp_path):
    path, model = saved
    image = random_image(32)
    image.save(tmp_path / "image.png")
    out = run_without_magma_hf(REMOTE_PIPELINES, str(path), str(tmp_path / "image.png"), QUESTION, cwd=tmp_path)
    caption, answer = greedy_texts(model, processor, image, ["", QUESTION])
    for task in TASKS:
        assert out[task]["class"].startswith("transformers_modules.")
        assert out[task]["class"].endswith("pipeline_magma.MagmaImageToTextPipeline")
        assert (out[task]["caption"], out[task]["answer"]) == ([caption], [answer])


def test_saving_leaves_the_live_config_unchanged(saved, model, tmp_path):
    before = model.config.to_dict()
    model.save_pretrained(tmp_path / "first")
    assert model.config.to_dict() == before
    assert not hasattr(model.config, "custom_pipelines")
    written = json.loads((tmp_path / "first" / "config.json").read_text())
    assert written["architectures"] == ["MagmaForConditionalGeneration"] and "AutoModel" in written["auto_map"]
    reloaded = MagmaForConditionalGeneration.from_pretrained(saved[0])
    before = reloaded.config.to_dict()
    reloaded.save_pretrained(tmp_path / "second")
    assert reloaded.config.to_dict() == before
    again = json.loads((tmp_path / "second" / "config.json").read_text())
    assert again["custom_pipelines"] == written["custom_pipelines"] and again["auto_map"] == written["auto_map"]
    # and saved through the pipeline (transformers' Pipeline.save_pretrained sets custom_pipelines to write it)
    pipe = pipeline("image-text-to-text", model=reloaded, processor=MagmaProcessor.from_pretrained(saved[0]))
    pipe.save_pretrained(tmp_path / "from_pipeline")
    assert reloaded.config.to_dict() == before
    from_pipeline = json.loads((tmp_path / "from_pipeline" / "config.json").read_text())
    assert from_pipeline["custom_pipelines"] == written["custom_pipelines"]
    # the config saved alone (trainer checkpoints, the adapter export) is left as it was too
    before = model.config.to_dict()
    model.config.save_pretrained(tmp_path / "config_alone")
    assert model.config.to_dict() == before
    assert json.loads((tmp_path / "config_alone" / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_magma.MagmaConfig"
    }


def test_generation_defaults_come_from_generation_config_json(saved, model):
    # a model built from a bare config gets transformers' defaults from its config, as any transformers model
    assert not model.generation_config.do_sample and model.generation_config.temperature in (None, 1.0)
    assert model.generation_config.eos_token_id == model.config.text_config.eos_token_id
    # MAGMA's defaults are those a folder carries
    path, saved_model = saved
    written = json.loads((path / "generation_config.json").read_text())
    assert not written.get("do_sample") and "temperature" not in written  # saved from a bare-config model
    model.generation_config = magma_generation_config(model.config)
    model.save_pretrained(path.parent / "with_magma_defaults")
    loaded = MagmaForConditionalGeneration.from_pretrained(path.parent / "with_magma_defaults")
    assert {key: getattr(loaded.generation_config, key) for key in MAGMA_GENERATION_DEFAULTS} == (
        MAGMA_GENERATION_DEFAULTS
    )


def transformers_sampling_probs(logits: torch.Tensor, **settings) -> torch.Tensor:
    """The distribution `generate` samples from with `settings` (top_k=0): temperature, then the nucleus."""
    config = GenerationConfig(do_sample=True, top_k=0, **settings)
    scores = TemperatureLogitsWarper(config.temperature)(None, logits.clone())
    if config.top_p < 1.0:
        scores = TopPLogitsWarper(config.top_p)(None, scores)
    return torch.softmax(scores, dim=-1)


PEAKED = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]])


def test_the_original_sampled_at_temperature_0_7_without_a_nucleus():
    assert torch.softmax(PEAKED, -1).max() >= 0.1  # the top token holds more than 1 - top_p
    original = original_sampling_probs(PEAKED, temperature=0.7, top_p=0.9)
    reproducing = transformers_sampling_probs(PEAKED, temperature=0.7, top_p=1.0)
    torch.testing.assert_close(reproducing, original, rtol=0, atol=1e-7)
    shipped = transformers_sampling_probs(PEAKED, **{k: MAGMA_GENERATION_DEFAULTS[k] for k in ("temperature", "top_p")})
    assert (original > 0).sum() == 12 and (shipped > 0).sum() < 12  # the true nucleus drops the tail
    assert (shipped - original).abs().sum() / 2 > 0.01


def test_on_a_flat_distribution_the_original_dropped_tokens_after_the_first():
    flat = torch.linspace(0.0, -0.5, 40).unsqueeze(0)  # 40 tokens, none above 0.1
    kept = (original_sampling_probs(flat, temperature=0.7, top_p=0.9) > 0).nonzero()[:, 1].tolist()
    mass = torch.softmax(flat, -1)[0]
    first_kept_after_top = next(j for j in range(1, 40) if mass[:j].sum() >= 0.1)
    assert kept == [0, *range(first_kept_after_top, 40)] and first_kept_after_top > 1
