"""The converter from the original MAGMA checkpoint: against the original forward pass, the output folder, failures.

Checkpoints are built here in the original layout from the spec (tests/original_magma.py), saved with torch.save in
DeepSpeed's model-states layout or as a bare state dict, converted, and loaded back with the public API.
"""

import argparse
import json
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline

import magma_hf.conversion.magma_checkpoint as converter
import magma_hf.conversion.safetensors_writer as writer
import magma_hf.folders as folders
from magma_hf import MagmaForConditionalGeneration, MagmaModel, MagmaProcessor
from magma_hf.cli import main as cli_main
from magma_hf.conversion.magma_checkpoint import (
    CHECKPOINT_FILENAME,
    MagmaConversionError,
    convert_magma_checkpoint,
    resolve_checkpoint,
)
from tests.helpers import files_unchanged, original_preprocess, photo_variants, sample_photos, tiny_config
from tests.original_magma import OriginalMagma, deepspeed_checkpoint, original_state_dict, tiny_original_model

MLP_V1 = {"mlp": {"adapter_type": "normal", "downsample_factor": 4}}
V2 = {
    "mlp": {"adapter_type": "normal", "downsample_factor": 8},
    "attention": {"adapter_type": "normal", "downsample_factor": 8},
}
PARALLEL_LN = {
    "mlp": {"adapter_type": "parallel", "downsample_factor": 4, "add_layernorm": True},
    "attention": {"adapter_type": "scaled_parallel", "downsample_factor": 8, "add_layernorm": True},
}
SCALED_MLP = {
    "mlp": {"adapter_type": "scaled_parallel", "downsample_factor": 2},
    "attention": {"adapter_type": "parallel"},
}
# name: (adapter_config, checkpoint dtype, DeepSpeed wrapper, image size, output dtype, max_shard_size)
LAYOUTS = {
    "v1-float16-deepspeed": (MLP_V1, torch.float16, True, 384, None, "2GB"),
    "v2-float32-bare": (V2, torch.float32, False, 64, None, "2GB"),
    "parallel-layernorm-sharded": (PARALLEL_LN, torch.float32, True, 64, None, "100KB"),
    "scaled-parallel-to-bfloat16": (SCALED_MLP, torch.float32, True, 64, "bfloat16", "2GB"),
}
GREEDY_STEPS = 6


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path


def write_yaml(folder: Path, adapter_config: dict) -> Path:
    """An original training YAML: the model keys, plus training keys the converter must ignore."""
    path = folder / "magma.yml"
    settings = {
        "encoder_name": "clip_resnet_large",
        "adapter_config": adapter_config,
        "freeze_img_encoder": False,
        "use_image_embed_layernorm": True,
        "image_embed_dropout_prob": 0.1,
        "batch_size": 256,
        "lr": 8.0e-4,
    }
    path.write_text(yaml.safe_dump(settings))
    return path


def configs(original) -> dict:
    """--text-config / --vision-config for a tiny original model."""
    return {
        "text_config": {
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "rotary_dim": 8,
            "n_positions": 256,
            "vocab_size": original.vocab,
        },
        "vision_config": {"layers": [1, 1, 1, 1], "width": 8, "image_size": original.image_size},
    }


def save_checkpoint(folder: Path, state_dict: dict, wrapped: bool = True) -> Path:
    path = folder / CHECKPOINT_FILENAME
    torch.save(deepspeed_checkpoint(state_dict) if wrapped else state_dict, path)
    return path


class Conversions:
    """Each layout converted once per module."""

    def __init__(self, root: Path, tokenizer, tokenizer_dir: Path):
        self.root, self.tokenizer, self.tokenizer_dir, self.done = root, tokenizer, tokenizer_dir, {}

    def __call__(self, name: str):
        if name not in self.done:
            adapters, dtype, wrapped, image_size, out_dtype, shard = LAYOUTS[name]
            folder = self.root / name
            folder.mkdir()
            original = tiny_original_model(len(self.tokenizer), image_size=image_size, adapter_config=adapters)
            state_dict = original_state_dict(original, dtype, seed=list(LAYOUTS).index(name))
            checkpoint = save_checkpoint(folder, state_dict, wrapped)
            report = convert_magma_checkpoint(
                checkpoint,
                folder / "converted",
                magma_config=write_yaml(folder, adapters),
                tokenizer=self.tokenizer_dir,
                dtype=out_dtype,
                max_shard_size=shard,
                **configs(original),
            )
            self.done[name] = (original, state_dict, report)
        return self.done[name]


@pytest.fixture(scope="module")
def conversions(tmp_path_factory, tokenizer, tokenizer_dir):
    return Conversions(tmp_path_factory.mktemp("conversions"), tokenizer, tokenizer_dir)


def prompt(processor: MagmaProcessor, image_size: int):
    image = sample_photos()[0]
    inputs = processor(images=[image], text=["a photo of a"], return_tensors="pt")
    n_image = (image_size // 32) ** 2
    assert (inputs.input_ids[0, :n_image] == processor.image_token_id).all()
    return inputs, inputs.input_ids[:, n_image:]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_converted_model_matches_the_original_forward_pass(conversions, name):
    original, state_dict, report = conversions(name)
    out_dtype = LAYOUTS[name][4]
    if out_dtype is not None:  # the reference reads the weights as the output stores them
        state_dict = {k: v.to(getattr(torch, out_dtype)) if v.is_floating_point() else v for k, v in state_dict.items()}
    reference = OriginalMagma(original, state_dict)
    model, info = MagmaForConditionalGeneration.from_pretrained(
        report.output, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    processor = MagmaProcessor.from_pretrained(report.output)
    inputs, text_ids = prompt(processor, original.image_size)

    with torch.no_grad():
        logits = model.eval()(**inputs).logits
    expected = reference.logits(inputs.pixel_values, text_ids)
    assert logits.shape == expected.shape == (1, inputs.input_ids.shape[1], original.vocab)
    assert (logits - expected).abs().max() <= 1e-4

    generated = model.generate(**inputs, do_sample=False, max_new_tokens=GREEDY_STEPS)[:, inputs.input_ids.shape[1] :]
    assert generated.tolist() == reference.greedy(inputs.pixel_values, text_ids, GREEDY_STEPS).tolist()


def test_every_tensor_is_written_or_accounted_for(conversions):
    original, state_dict, report = conversions("v1-float16-deepspeed")
    n_aliases = sum(key.startswith(("word_embedding.", "transformer.")) for key in state_dict)
    n_buffers = sum(
        key.rsplit(".", 1)[-1] in ("bias", "masked_bias", "scale_attn", "sin", "cos") and ".attention." in key
        for key in state_dict
        if key.startswith("lm.")
    )
    assert report.dropped_aliases == n_aliases > 0
    assert report.dropped_buffers == n_buffers == 5 * original.layers
    assert report.tensors == len(state_dict) - n_aliases - n_buffers
    assert report.verify is not None and report.verify.tensors == report.tensors
    assert not report.verify.mismatched and report.verify.max_abs_diff == 0
    assert "all bitwise equal" in str(report)


def test_input_embedding_is_padded_with_zero_rows_to_the_head_vocabulary(conversions):
    original, state_dict, report = conversions("v1-float16-deepspeed")
    with safe_open(report.output / "model.safetensors", framework="pt") as shard:
        wte = shard.get_tensor("model.language_model.wte.weight")
        head = shard.get_tensor("lm_head.weight")
    source = state_dict["lm.transformer.wte.weight"]
    assert wte.shape == head.shape[:1] + source.shape[1:] and wte.dtype == torch.float16
    assert torch.equal(wte[: original.tokens], source)
    assert not wte[original.tokens :].any()


def test_output_is_a_hub_repo_that_loads_with_the_auto_classes_and_the_pipeline(conversions):
    original, state_dict, report = conversions("v1-float16-deepspeed")
    folder = report.output
    names = sorted(os.listdir(folder))
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "README.md",
        "modeling_magma.py",
        "processor_config.json",
        "tokenizer.json",
    ):
        assert name in names
    for path in folder.iterdir():  # no pickles, whatever their name
        assert path.suffix not in (".bin", ".pt", ".pth", ".pkl", ".ckpt")
        head = path.read_bytes()[:2]
        assert head != b"PK" and (path.suffix == ".safetensors" or head[:1] != b"\x80")
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "float16" and config["model_type"] == "magma"
    assert config["adapter_config"] == {
        "mlp": {"adapter_type": "normal", "downsample_factor": 4, "add_layernorm": False}
    }
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_magma.MagmaForConditionalGeneration"
    assert "image-to-text" in config["custom_pipelines"]
    generation = json.loads((folder / "generation_config.json").read_text())
    assert (generation["do_sample"], generation["temperature"], generation["top_p"], generation["top_k"]) == (
        True,
        0.7,
        0.9,
        0,
    )
    assert "pipeline_tag: image-text-to-text" in (folder / "README.md").read_text()

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(folder)
    assert isinstance(model, MagmaForConditionalGeneration) and isinstance(processor, MagmaProcessor)
    base, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    assert isinstance(base, MagmaModel) and not info["missing_keys"]
    assert processor.tokenizer.convert_ids_to_tokens(model.config.image_token_id) == "<|image|>"
    assert processor.tokenizer.model_max_length == 256  # n_positions, as the original set it

    inputs, text_ids = prompt(processor, original.image_size)
    expected = OriginalMagma(original, state_dict).greedy(inputs.pixel_values, text_ids[:, :0], 4)
    captioner = pipeline("image-to-text", model=str(folder), trust_remote_code=True, dtype=torch.float32)
    caption = captioner(sample_photos()[0], generate_kwargs={"do_sample": False, "max_new_tokens": 4})
    assert caption[0]["generated_text"] == processor.post_process_image_text_to_text(expected)[0]


# What every converted folder holds besides the weights: the configs, the processor's files, the model card, the
# conversion's manifest, and the code of the Hub export (the configuration and modeling files and what they import).
FOLDER_FILES = {
    "README.md",
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "magma_conversion.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


def exported_code_files() -> set[str]:
    from transformers.dynamic_module_utils import get_relative_import_files

    from magma_hf import configuration_magma, modeling_magma

    files = set()
    for module in (configuration_magma, modeling_magma):
        files |= {module.__file__, *get_relative_import_files(module.__file__)}
    return {Path(file).name for file in files}


@pytest.mark.parametrize("name", ["v1-float16-deepspeed", "parallel-layernorm-sharded"])
def test_converted_folder_holds_exactly_the_expected_files_and_loads(conversions, name):
    _, _, report = conversions(name)
    n = len(report.shards)
    assert (n == 1) == (name == "v1-float16-deepspeed")
    weights = {"model.safetensors"} if n == 1 else {f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)}
    weights |= {"model.safetensors.index.json"} if n > 1 else set()
    assert {"modeling_magma.py", "configuration_magma.py", "pipeline_magma.py"} <= exported_code_files()
    assert sorted(os.listdir(report.output)) == sorted(FOLDER_FILES | exported_code_files() | weights)
    model, info = AutoModelForImageTextToText.from_pretrained(report.output, output_loading_info=True)
    assert isinstance(model, MagmaForConditionalGeneration) and not any(info.values()), info
    assert isinstance(AutoProcessor.from_pretrained(report.output), MagmaProcessor)


def test_the_model_files_are_what_save_pretrained_writes_besides_the_weights(tmp_path, tokenizer):
    """The converter writes config.json, generation_config.json, the code and the card itself (no `save_pretrained`
    whose weights are then deleted): byte for byte what `save_pretrained` writes, the live config left as it was."""
    from magma_hf.factory import empty_model

    model = empty_model(tiny_config(tokenizer), torch.bfloat16)  # as the converter builds it
    before = model.config.to_dict()
    written, saved = tmp_path / "written" / "magma", tmp_path / "saved" / "magma"  # the card names the folder
    written.mkdir(parents=True)
    converter.save_model_files(model, written)
    assert model.config.to_dict() == before
    model.save_pretrained(saved, state_dict={})
    names = sorted(name for name in os.listdir(saved) if not name.startswith("model.safetensors"))
    assert sorted(os.listdir(written)) == names
    assert {"config.json", "generation_config.json", "README.md", "modeling_magma.py"} <= set(names)
    for name in names:
        assert (written / name).read_bytes() == (saved / name).read_bytes(), name


def test_written_processor_reproduces_the_original_preprocessing_on_photographs(conversions):
    _, _, report = conversions("v1-float16-deepspeed")
    image_processor = AutoProcessor.from_pretrained(report.output).image_processor
    for image in photo_variants():
        ours = image_processor(image, return_tensors="np")["pixel_values"][0]
        assert ours.shape == (3, 384, 384)
        assert abs(ours - original_preprocess(image, 384)).max() <= 1e-5, image.size


def test_sharded_output_has_an_index_covering_every_tensor(conversions):
    _, _, report = conversions("parallel-layernorm-sharded")
    index = json.loads((report.output / "model.safetensors.index.json").read_text())
    assert len(report.shards) > 1 and sorted(set(index["weight_map"].values())) == sorted(report.shards)
    stored = {}
    for shard in report.shards:
        assert (report.output / shard).stat().st_size <= 100_000 + 50_000  # a tensor never splits: small overshoot
        with safe_open(report.output / shard, framework="pt") as handle:
            stored.update(dict.fromkeys(handle.keys(), shard))
    assert stored == index["weight_map"] and len(stored) == report.tensors


def test_dtype_cast_keeps_integer_buffers(conversions):
    _, state_dict, report = conversions("scaled-parallel-to-bfloat16")
    dtypes = {}
    for shard in report.shards:
        with safe_open(report.output / shard, framework="pt") as handle:
            for name in handle.keys():
                dtypes[name] = handle.get_slice(name).get_dtype()
    assert {dtype for name, dtype in dtypes.items() if "num_batches_tracked" not in name} == {"BF16"}
    assert {dtype for name, dtype in dtypes.items() if "num_batches_tracked" in name} == {"I64"}
    assert json.loads((report.output / "config.json").read_text())["dtype"] == "bfloat16"


def test_command_line_wrapper_converts(tmp_path, tokenizer, tokenizer_dir, monkeypatch, capsys):
    original = tiny_original_model(len(tokenizer), adapter_config=MLP_V1)
    checkpoint = save_checkpoint(tmp_path, original_state_dict(original, torch.float16))
    sizes = configs(original)
    argv = [
        "python -m magma_hf.conversion", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "out"),
        "--magma-config", str(write_yaml(tmp_path, MLP_V1)), "--text-config", json.dumps(sizes["text_config"]),
        "--vision-config", json.dumps(sizes["vision_config"]), "--tokenizer", str(tokenizer_dir),
        "--dtype", "float32", "--max-shard-size", "300000", "--no-verify",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:  # as `python -m magma_hf.conversion ...` runs it
        runpy.run_module("magma_hf.conversion", run_name="__main__", alter_sys=True)
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "float32" in printed and "verified" not in printed
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "float32" and config["text_config"]["n_embd"] == 64
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1


def test_hub_repo_ids_are_downloaded_with_huggingface_hub(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        path = tmp_path / filename
        path.write_bytes(b"")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert resolve_checkpoint("Aleph-Alpha/magma-research", download=False) is None and not calls
    assert resolve_checkpoint("Aleph-Alpha/magma-research") == tmp_path / CHECKPOINT_FILENAME
    assert calls == [("Aleph-Alpha/magma-research", CHECKPOINT_FILENAME)]

    def offline(repo_id, filename, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline and not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(MagmaConversionError, match="magma-research.*LocalEntryNotFoundError: offline"):
        resolve_checkpoint("Aleph-Alpha/magma-research")


def test_deepspeed_folders_resolve_through_latest(tmp_path):
    (tmp_path / "global_step150000").mkdir()
    (tmp_path / "global_step150000" / CHECKPOINT_FILENAME).write_bytes(b"")
    (tmp_path / "latest").write_text("global_step150000\n")
    assert resolve_checkpoint(tmp_path) == tmp_path / "global_step150000" / CHECKPOINT_FILENAME
    with pytest.raises(MagmaConversionError, match="is not an existing file"):
        resolve_checkpoint("./no/such.pt")


# --------------------------------------------------------------------------------------------------------------------
# Failures: a clear message, and nothing written
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tokenizer):
    original = tiny_original_model(len(tokenizer), adapter_config=MLP_V1)
    return original, original_state_dict(original, torch.float16, seed=7)


def convert_small(
    folder: Path, small, tokenizer_dir, state_dict=None, checkpoint=None, adapter_config=MLP_V1, **kwargs
):
    original, default = small
    if checkpoint is None:
        checkpoint = save_checkpoint(folder, default if state_dict is None else state_dict)
    return convert_magma_checkpoint(
        checkpoint,
        folder / "out",
        magma_config=write_yaml(folder, adapter_config),
        tokenizer=tokenizer_dir,
        **configs(original),
        **kwargs,
    )


def assert_fails(folder: Path, pattern: str, run) -> str:
    with pytest.raises(MagmaConversionError, match=pattern) as error:
        run()
    assert not (folder / "out").exists() or (folder / "out" / "mine.txt").is_file()  # nothing written or replaced
    assert not [name for name in os.listdir(folder) if name.startswith(".")]  # no temporary folder left behind
    return str(error.value)


def edited(small, edit):
    state_dict = dict(small[1])
    edit(state_dict)
    return state_dict


def test_missing_key(tmp_path, small, tokenizer_dir):
    state_dict = edited(small, lambda sd: sd.pop("lm.transformer.h.1.ln_1.bias"))
    message = assert_fails(
        tmp_path, "1 missing tensors", lambda: convert_small(tmp_path, small, tokenizer_dir, state_dict)
    )
    assert "lm.transformer.h.1.ln_1.bias" in message and "nothing was written" in message


def test_unexpected_key(tmp_path, small, tokenizer_dir):
    state_dict = edited(small, lambda sd: sd.update({"image_prefix.enc.attnpool.c_proj.weight": torch.zeros(2, 2)}))
    message = assert_fails(tmp_path, "1 unexpected", lambda: convert_small(tmp_path, small, tokenizer_dir, state_dict))
    assert "image_prefix.enc.attnpool.c_proj.weight" in message


def test_wrong_shape(tmp_path, small, tokenizer_dir):
    state_dict = edited(
        small, lambda sd: sd.update({"image_prefix.proj.weight": torch.zeros(64, 128, dtype=torch.float16)})
    )
    message = assert_fails(
        tmp_path, "shapes that disagree", lambda: convert_small(tmp_path, small, tokenizer_dir, state_dict)
    )
    assert "image_prefix.proj.weight: [64, 128]; the configs give [64, 256]" in message


def test_alias_that_differs_from_its_original(tmp_path, small, tokenizer_dir):
    def edit(sd):
        sd["transformer.0.mlp.0.c_fc.bias"] = sd["transformer.0.mlp.0.c_fc.bias"] + 1

    state_dict = edited(small, edit)
    message = assert_fails(tmp_path, "alias", lambda: convert_small(tmp_path, small, tokenizer_dir, state_dict))
    assert "transformer.0.mlp.0.c_fc.bias differs from lm.transformer.h.0.mlp.0.c_fc.bias" in message


def test_buffer_that_does_not_hold_what_it_should(tmp_path, small, tokenizer_dir):
    def edit(sd):
        sd["lm.transformer.h.0.attn.attention.scale_attn"] = torch.tensor(8.0, dtype=torch.float16)
        sd["lm.transformer.h.1.attn.attention.bias"] = torch.ones_like(sd["lm.transformer.h.1.attn.attention.bias"])

    state_dict = edited(small, edit)
    message = assert_fails(
        tmp_path, "buffers that do not hold", lambda: convert_small(tmp_path, small, tokenizer_dir, state_dict)
    )
    assert "h.0.attn.attention.scale_attn expected the scalar sqrt(head size 16) = 4; got [8.0]" in message
    assert "h.1.attn.attention.bias is not the lower-triangular causal mask" in message


def test_adapter_layout_mismatch_names_the_keys_and_the_layout_found(tmp_path, small, tokenizer_dir):
    message = assert_fails(
        tmp_path, "missing", lambda: convert_small(tmp_path, small, tokenizer_dir, adapter_config=V2)
    )
    assert "lm.transformer.h.{0-1}.attn.attn_block.attention.q_proj.weight" in message  # grouped over the blocks
    assert "lm.transformer.h.{0-1}.attn.attention.q_proj.weight" in message  # unexpected: the checkpoint's name
    assert "look like adapter_config {'mlp': {'adapter_type': 'normal', 'downsample_factor': 4" in message


def test_truncated_download(tmp_path, small, tokenizer_dir):
    checkpoint = save_checkpoint(tmp_path, small[1])
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])
    message = assert_fails(
        tmp_path, "truncated", lambda: convert_small(tmp_path, small, tokenizer_dir, checkpoint=checkpoint)
    )
    assert str(checkpoint) in message


def test_html_page_saved_as_the_checkpoint(tmp_path, small, tokenizer_dir):
    checkpoint = tmp_path / CHECKPOINT_FILENAME
    checkpoint.write_text("<!DOCTYPE html><html><body>Google Drive can't scan this file for viruses</body></html>")
    assert_fails(tmp_path, "HTML page", lambda: convert_small(tmp_path, small, tokenizer_dir, checkpoint=checkpoint))


class RunsCode:
    """A pickled object whose unpickling creates a folder: what weights-only loading must refuse to do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_unsafe_pickle_is_refused_unless_allowed(tmp_path, small, tokenizer_dir):
    marker = tmp_path / "code-ran"
    checkpoint = tmp_path / CHECKPOINT_FILENAME
    torch.save({**deepspeed_checkpoint(small[1]), "config": RunsCode(str(marker))}, checkpoint)
    message = assert_fails(
        tmp_path,
        "weights-only loading refuses: os.makedirs",
        lambda: convert_small(tmp_path, small, tokenizer_dir, checkpoint=checkpoint),
    )
    assert "--allow-unsafe-pickle" in message and not marker.exists()

    report = convert_small(tmp_path, small, tokenizer_dir, checkpoint=checkpoint, allow_unsafe_pickle=True)
    assert marker.exists() and report.verify.tensors == report.tensors


def test_namespace_in_the_bookkeeping_loads_weights_only(tmp_path, small, tokenizer_dir):
    checkpoint = tmp_path / CHECKPOINT_FILENAME
    torch.save({**deepspeed_checkpoint(small[1]), "args": argparse.Namespace(deepspeed=True, local_rank=0)}, checkpoint)
    report = convert_small(tmp_path, small, tokenizer_dir, checkpoint=checkpoint, verify=False)
    assert report.tensors > 0 and (tmp_path / "out" / "model.safetensors").is_file()


def conversion_names(output: Path, *user_files: str) -> list[str]:
    """The files a conversion wrote into `output` (all but the user's)."""
    return sorted(set(os.listdir(output)) - set(user_files))


def test_output_holding_the_checkpoint_keeps_it_and_the_users_files(tmp_path, small, tokenizer_dir, capsys):
    """The checkpoint downloaded into the folder it is converted into: with and without --overwrite, and twice."""
    output = tmp_path / "out"
    output.mkdir()
    checkpoint = save_checkpoint(output, small[1])
    (output / "notes.txt").write_text("where I got it")
    (output / "README.md").write_text("# my model card")
    user_files = (CHECKPOINT_FILENAME, "notes.txt", "README.md")
    with files_unchanged(output):  # nothing the user had is touched
        report = convert_small(tmp_path, small, tokenizer_dir, checkpoint=checkpoint)
    assert report.changes.kept == sorted(user_files) and not report.changes.replaced
    assert "kept (not written by a conversion)" in str(report) and "README.md is yours and was kept" in str(report)
    written = conversion_names(output, *user_files)
    assert converter.MANIFEST_NAME in written and all(converter.may_be_written(name) for name in written)
    MagmaForConditionalGeneration.from_pretrained(output)  # a model folder, the checkpoint beside it

    argv = ["convert", "--checkpoint", str(checkpoint), "--output", str(output), "--tokenizer", str(tokenizer_dir)]
    with files_unchanged(tmp_path, no_new_files=True):  # the same command twice: refused, nothing written
        assert cli_main(argv) == 2
    error = capsys.readouterr().err
    assert "holds an earlier conversion" in error and "--overwrite" in error and "3 entries there are kept" in error

    with files_unchanged(output, may_change=written):  # --overwrite replaces the conversion's files only
        report = convert_small(tmp_path, small, tokenizer_dir, checkpoint=checkpoint, overwrite=True)
    assert report.changes.replaced == written and report.changes.kept == sorted(user_files)
    assert "replaced (an earlier conversion's): README.md" not in str(report) and "config.json" in str(report)
    assert conversion_names(output, *user_files) == written
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # no temporary folder left


def test_overwrite_replaces_only_unchanged_files_of_an_earlier_conversion(tmp_path, small, tokenizer_dir):
    output = tmp_path / "out"
    report = convert_small(tmp_path, small, tokenizer_dir, max_shard_size="100KB")
    shards = report.shards
    assert len(shards) > 1
    # a new layout: the earlier shards are removed (a stale shard beside a new index would mislead a loader)
    report = convert_small(tmp_path, small, tokenizer_dir, overwrite=True)
    assert sorted(report.changes.removed) == sorted(shards + ["model.safetensors.index.json"])
    assert report.shards == ["model.safetensors"] and not set(shards) & set(os.listdir(output))
    MagmaForConditionalGeneration.from_pretrained(output)

    # a file the user edited since, and files no conversion wrote (a folder converted by an older version)
    generation = output / "generation_config.json"
    generation.write_text(generation.read_text().replace("0.7", "0.5"))
    (output / converter.MANIFEST_NAME).unlink()
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "config.json").write_text("{}")
    for folder, named in ((output, "generation_config.json"), (tmp_path / "theirs", "config.json")):
        with files_unchanged(tmp_path, no_new_files=True), pytest.raises(MagmaConversionError) as error:
            convert_magma_checkpoint(
                tmp_path / CHECKPOINT_FILENAME, folder, magma_config=tmp_path / "magma.yml", tokenizer=tokenizer_dir,
                overwrite=True, **configs(small[0]),
            )  # fmt: skip
        message = str(error.value)
        assert "that no conversion wrote there (or that changed since" in message and named in message
        assert "not replaced, even with --overwrite" in message


def test_a_failing_overwrite_leaves_the_earlier_conversion(tmp_path, small, tokenizer_dir):
    output = tmp_path / "out"
    convert_small(tmp_path, small, tokenizer_dir)
    broken = edited(small, lambda sd: sd.pop("lm.lm_head.bias"))
    with files_unchanged(output), pytest.raises(MagmaConversionError, match="missing"):
        convert_small(tmp_path, small, tokenizer_dir, broken, overwrite=True)
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]


KILLED_CONVERSION = """
import json, os, signal, sys, time
import magma_hf.conversion.magma_checkpoint as converter
import magma_hf.conversion.weights as weights
marker, stop_at, argv = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
calls, produce = [], weights.produce_parts

def produce_then_wait(entry, *args, **kwargs):  # in the middle of a shard: the file is half written
    calls.append(entry.name)
    if stop_at == "weights" and len(calls) == 12:
        open(marker, "w").close()
        time.sleep(60)
    return produce(entry, *args, **kwargs)

def moved_then_die(move):  # os.rename moves the earlier files aside, os.replace the new ones in
    def moving(source, target):
        move(source, target)
        if stop_at == "install" and "previous" not in str(target) and os.path.basename(str(target)) == "config.json":
            os.kill(os.getpid(), signal.SIGKILL)  # some new files in place, the earlier ones moved aside
    return moving

weights.produce_parts = produce_then_wait
os.rename, os.replace = moved_then_die(os.rename), moved_then_die(os.replace)
sys.exit(converter.main(argv))
"""


def kill_a_conversion(tmp_path, argv, stop_at: str) -> int:
    import signal
    import subprocess
    import time

    marker = tmp_path / "writing"
    child = subprocess.Popen([sys.executable, "-c", KILLED_CONVERSION, str(marker), stop_at, json.dumps(argv)])
    if stop_at == "weights":
        deadline = time.monotonic() + 120
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the conversion never reached the weights"
        os.kill(child.pid, signal.SIGKILL)
        marker.unlink()
    return child.wait(timeout=120)


def cli_arguments(tmp_path: Path, small, tokenizer_dir, checkpoint: Path, output: Path) -> list[str]:
    """`magma-hf convert` arguments for the tiny model of `small` (after `convert_small` wrote magma.yml)."""
    sizes = configs(small[0])
    return [
        "--checkpoint", str(checkpoint), "--output", str(output), "--magma-config", str(write_yaml(tmp_path, MLP_V1)),
        "--tokenizer", str(tokenizer_dir), "--text-config", json.dumps(sizes["text_config"]),
        "--vision-config", json.dumps(sizes["vision_config"]),
    ]  # fmt: skip


@pytest.mark.parametrize("stop_at", ["weights", "install"])
def test_a_killed_conversion_leaves_the_output_and_the_next_run_cleans_up(tmp_path, small, tokenizer_dir, stop_at):
    output = tmp_path / "out"
    convert_small(tmp_path, small, tokenizer_dir, max_shard_size="100KB")  # an earlier conversion, to be replaced
    (output / "notes.txt").write_text("mine")
    argv = cli_arguments(tmp_path, small, tokenizer_dir, tmp_path / CHECKPOINT_FILENAME, output)
    argv += ["--overwrite", "--max-shard-size", "200KB"]
    with files_unchanged(output):  # a real SIGKILL (then, when cut short while installing, the rollback)
        assert kill_a_conversion(tmp_path, argv, stop_at) == -9
        (leftover,) = converter.CONVERSION_FOLDER.leftover_workspaces(output)
        assert leftover.name.startswith(".out.converting-")
        if stop_at == "install":  # some files moved: a mixed folder until the next run rolls it back
            assert (leftover / folders.INSTALL_JOURNAL).is_file()
            assert {"config.json", "notes.txt"} < set(os.listdir(output))
            recovered = converter.CONVERSION_FOLDER.recover(output)
            assert len(recovered) == 1 and "rolled back" in recovered[0] and leftover.name in recovered[0]
    if stop_at == "weights":  # the next run recognises the leftover, removes it and converts
        report = convert_small(tmp_path, small, tokenizer_dir, overwrite=True)
        assert len(report.recovered) == 1 and f"removed {leftover.name}" in str(report)
        assert (output / "notes.txt").read_text() == "mine" and report.shards == ["model.safetensors"]
    assert not leftover.exists() and not converter.CONVERSION_FOLDER.leftover_workspaces(output)


def test_a_failure_while_installing_rolls_back(tmp_path, small, tokenizer_dir, monkeypatch):
    output = tmp_path / "out"
    convert_small(tmp_path, small, tokenizer_dir, max_shard_size="100KB")
    (output / "notes.txt").write_text("mine")
    replace, failed = os.replace, []

    def failing_replace(source, target):  # the new config.json cannot be moved in (once: the rollback can)
        if Path(target) == output / "config.json" and not failed:
            failed.append(target)
            raise OSError(28, "No space left on device")
        replace(source, target)

    monkeypatch.setattr(os, "replace", failing_replace)
    with files_unchanged(output), pytest.raises(MagmaConversionError, match="No space left on device"):
        convert_small(tmp_path, small, tokenizer_dir, overwrite=True)
    assert not converter.CONVERSION_FOLDER.leftover_workspaces(output)


def test_a_running_conversion_is_not_taken_for_a_leftover(tmp_path, small, tokenizer_dir):
    workspace = tmp_path / ".out.converting-abc12345"
    workspace.mkdir()
    descriptor = converter.CONVERSION_FOLDER.take_lock(workspace)  # held, as a running conversion holds it
    try:
        with (
            files_unchanged(tmp_path),
            pytest.raises(MagmaConversionError, match="another conversion into .* is running"),
        ):
            convert_small(tmp_path, small, tokenizer_dir)
    finally:
        os.close(descriptor)
    assert workspace.is_dir()

    (workspace / converter.CONVERSION_FOLDER.lock_name).unlink()
    (workspace / "my-notes.txt").write_text("not a conversion's")  # named like one, but not a conversion's folder
    with files_unchanged(tmp_path), pytest.raises(MagmaConversionError, match="does not look like one"):
        convert_small(tmp_path, small, tokenizer_dir)


def test_a_kill_while_writing_the_install_journal_is_cleaned_up(tmp_path, small, tokenizer_dir):
    workspace = tmp_path / ".out.converting-abcd1234"
    (workspace / "out").mkdir(parents=True)
    os.close(converter.CONVERSION_FOLDER.take_lock(workspace))  # released, as a SIGKILL releases it
    (workspace / f".{folders.INSTALL_JOURNAL}.k1ll3d_x.tmp").write_text('{"stag')  # the journal's atomic write
    report = convert_small(tmp_path, small, tokenizer_dir)
    assert f"removed {workspace.name}" in str(report) and not workspace.exists()


def test_another_outputs_temporary_folder_is_never_taken_for_this_ones(tmp_path, small, tokenizer_dir):
    theirs = [tmp_path / ".run1.converting-abcd1234", tmp_path / ".out.converting-x.converting-abcd1234"]
    for folder in theirs:  # `run[1]` as a glob matches `run1`; `out` is a prefix of `out.converting-x`
        folder.mkdir()
        (folder / "converting.lock").write_text("pid 1\n")
    checkpoint = save_checkpoint(tmp_path, small[1])
    original = small[0]
    with files_unchanged(*theirs):
        for output in (tmp_path / "run[1]", tmp_path / "out"):
            convert_magma_checkpoint(
                checkpoint, output, magma_config=write_yaml(tmp_path, MLP_V1), tokenizer=tokenizer_dir,
                **configs(original),
            )  # fmt: skip
            assert (output / "config.json").is_file()


def test_output_dot_converts_into_the_folder_holding_the_checkpoint(tmp_path, small, tokenizer_dir, monkeypatch):
    save_checkpoint(tmp_path, small[1])
    magma_yaml = write_yaml(tmp_path, MLP_V1)
    monkeypatch.chdir(tmp_path)
    with files_unchanged(tmp_path):
        report = convert_magma_checkpoint(
            CHECKPOINT_FILENAME, ".", magma_config=magma_yaml, tokenizer=tokenizer_dir, **configs(small[0])
        )
    assert (tmp_path / "config.json").is_file() and report.shards == ["model.safetensors"]
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]


def test_output_parent_missing_or_read_only_is_one_line(tmp_path, small, tokenizer_dir, capsys, monkeypatch):
    checkpoint = save_checkpoint(tmp_path, small[1])
    missing = tmp_path / "no" / "such"
    argv = ["convert", *cli_arguments(tmp_path, small, tokenizer_dir, checkpoint, missing / "out")]
    with files_unchanged(tmp_path, no_new_files=True):
        assert cli_main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"the folder {missing} that should hold it does not exist" in error

    def read_only(*args, **kwargs):  # what a folder without write permission gives a user who is not root
        raise PermissionError(13, "Permission denied", str(kwargs.get("dir")))

    monkeypatch.setattr(folders.tempfile, "mkdtemp", read_only)
    argv[argv.index("--output") + 1] = str(tmp_path / "out")
    with files_unchanged(tmp_path, no_new_files=True):
        assert cli_main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error and "converting" not in error
    assert f"{tmp_path}: Permission denied" in error


def test_a_full_disk_is_named_before_anything_is_written(tmp_path, small, tokenizer_dir, monkeypatch):
    import collections

    save_checkpoint(tmp_path, small[1])
    write_yaml(tmp_path, MLP_V1)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(converter.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 5000, 5000))
    with files_unchanged(tmp_path, no_new_files=True), pytest.raises(MagmaConversionError) as error:
        convert_small(tmp_path, small, tokenizer_dir)
    assert f"not enough space for --output {tmp_path / 'out'}" in str(error.value)
    assert f"{tmp_path} has 0.00 GB free; nothing was written" in str(error.value)


@pytest.mark.parametrize("verify", [True, False])
def test_non_finite_weights_are_named_and_refused_unless_allowed(tmp_path, small, tokenizer_dir, verify):
    original = small[0]
    state_dict = dict(original_state_dict(original, torch.float32, seed=7))
    state_dict["image_prefix.proj.weight"] = state_dict["image_prefix.proj.weight"].clone()
    state_dict["image_prefix.proj.weight"][0, :3] = 1e6  # finite in float32, beyond float16's 65504
    state_dict["lm.lm_head.bias"] = state_dict["lm.lm_head.bias"].clone()
    state_dict["lm.lm_head.bias"][5] = float("nan")
    checkpoint = save_checkpoint(tmp_path, state_dict)
    write_yaml(tmp_path, MLP_V1)
    with files_unchanged(tmp_path, no_new_files=True), pytest.raises(MagmaConversionError) as error:
        convert_small(tmp_path, small, tokenizer_dir, checkpoint=checkpoint, dtype="float16", verify=verify)
    message = str(error.value)
    assert "2 tensors would hold values that are not finite" in message and "--allow-non-finite" in message
    assert "model.multi_modal_projector.proj.weight (image_prefix.proj.weight): 3 values overflow float16" in message
    assert "lm_head.bias (lm.lm_head.bias): the checkpoint holds 1 NaN and 0 inf values" in message

    report = convert_small(
        tmp_path, small, tokenizer_dir, checkpoint=checkpoint, dtype="float16", verify=verify, allow_non_finite=True
    )
    assert len(report.non_finite) == 2 and "NOT FINITE" in str(report)
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as shard:
        assert torch.isinf(shard.get_tensor("model.multi_modal_projector.proj.weight")[0, :3]).all()


def refused_conversion_error(checkpoint: Path, tmp_path: Path, tokenizer_dir: Path, capsys) -> str:
    """`magma-hf convert` of `checkpoint` into `tmp_path/out` fails, writes nothing, changes nothing: its stderr."""
    argv = ["convert", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "out")]
    with files_unchanged(tmp_path, no_new_files=True):
        assert cli_main(argv + ["--tokenizer", str(tokenizer_dir)]) == 2
    return capsys.readouterr().err


def test_a_plain_gptj_state_dict_is_recognised_in_one_line(tmp_path, small, tokenizer_dir, capsys):
    from transformers import GPTJConfig, GPTJForCausalLM

    gptj = GPTJForCausalLM(GPTJConfig(n_embd=16, n_layer=2, n_head=2, rotary_dim=4, vocab_size=50, n_positions=32))
    checkpoint = tmp_path / "pytorch_model.pt"
    torch.save(gptj.state_dict(), checkpoint)
    error = refused_conversion_error(checkpoint, tmp_path, tokenizer_dir, capsys)
    assert (
        error.count("\n") == 1 and "is not an original MAGMA checkpoint: it is a Hugging Face GPT-J state dict" in error
    )


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "it is empty: the download probably failed"),
        (b"Entry not found", "(starts with 'Entry not found'), not the checkpoint: the download probably failed"),
        (b"<!DOCTYPE html><html><title>Sign in</title>", "HTML page (starts with '<!DOCTYPE html><html><title>Sign in"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 12\n", "Git LFS pointer"),
    ],
)  # fmt: skip
def test_a_failed_download_says_what_the_file_starts_with(tmp_path, small, tokenizer_dir, capsys, content, expected):
    checkpoint = tmp_path / CHECKPOINT_FILENAME
    checkpoint.write_bytes(content)
    error = refused_conversion_error(checkpoint, tmp_path, tokenizer_dir, capsys)
    assert error.count("\n") == 1 and str(checkpoint) in error and expected in error


def test_verification_catches_a_corrupted_write(tmp_path, small, tokenizer_dir, monkeypatch):
    write = writer.write_safetensors_file

    def corrupting(path, entries, produce, done=lambda entry: None, metadata=None):
        def produce_wrong(entry):
            parts = produce(entry)
            if entry.name != "lm_head.bias":
                return parts
            return [writer.part_tensor(part) + 1 for part in parts]

        return write(path, entries, produce_wrong, done, metadata)

    monkeypatch.setattr(writer, "write_safetensors_file", corrupting)
    message = assert_fails(tmp_path, "verification failed", lambda: convert_small(tmp_path, small, tokenizer_dir))
    assert "lm_head.bias" in message
