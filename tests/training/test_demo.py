"""`magma-hf demo` at its small size: the whole run once (about half a minute), then its invariants."""

import json

import pytest
import torch
from PIL import Image

from magma_hf.cli import main
from magma_hf.data import load_magma_dataset
from magma_hf.demo import MARKER, QUESTIONS, caption_for, prepare_output_dir, text_corpus
from magma_hf.training.run import MagmaTrainingConfig


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("demo") / "demo-output"
    threads = torch.get_num_threads()
    assert main(["demo", "--size", "small", "--seed", "1", "--output-dir", str(output_dir)]) == 0
    assert torch.get_num_threads() == threads  # the command gives the thread setting back
    return output_dir, json.loads((output_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_demo_captions_held_out_digits_and_leaves_the_language_model_alone(demo_run):
    output_dir, metrics = demo_run
    for key in ("caption_accuracy", "blind_caption_accuracy", "lm_unchanged", "train_seconds", "total_seconds"):
        assert key in metrics
    # ten digits: chance is 0.1; a blank image carries no information, so blind captions stay near chance
    assert metrics["caption_accuracy"] >= 0.6
    assert metrics["blind_caption_accuracy"] <= 0.3
    assert metrics["lm_unchanged"] is True
    assert metrics["pipeline_matches_model"] is True
    assert 0 < metrics["train_seconds"] < metrics["total_seconds"]
    for name, result in metrics["knowledge_transfer"].items():
        assert result["question"] == QUESTIONS[name].prompt
        for key in ("accuracy", "blind_accuracy", "chance", "text_accuracy"):
            assert 0.0 <= result[key] <= 1.0

    predictions = [json.loads(line) for line in (output_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == metrics["test_images"]
    right = sum(p["caption"] == p["reference"] == caption_for(p["digit"]) for p in predictions)
    assert right / len(predictions) == pytest.approx(metrics["caption_accuracy"])

    with Image.open(output_dir / "contact_sheet.png") as sheet:
        assert sheet.format == "PNG" and sheet.width > 10 * 96
    assert (output_dir / "magma" / "config.json").is_file()
    assert (output_dir / "magma" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_demo_data_is_real_digits_in_the_magma_layout_with_captions_only(demo_run):
    output_dir, metrics = demo_run
    train = load_magma_dataset(output_dir / "data" / "train").with_format(None)
    test = load_magma_dataset(output_dir / "data" / "test").with_format(None)
    assert (len(train), len(test)) == (metrics["train_images"], metrics["test_images"])
    assert len(list((output_dir / "data" / "train" / "image_data").rglob("*.json"))) == len(train)
    train_indices = {json.loads(m)["index"] for m in train["metadata"]}
    test_indices = {json.loads(m)["index"] for m in test["metadata"]}
    assert not train_indices & test_indices  # held out means held out
    # MAGMA's training sees captions only: the questions of the transfer test never come with an image
    for captions, metadata in zip(train["captions"], train["metadata"]):
        assert captions == [caption_for(json.loads(metadata)["digit"])]
    with Image.open(train["image_path"][0]) as image:
        assert image.size == (8, 8)  # scikit-learn's scans as they are

    config = MagmaTrainingConfig.from_yaml(output_dir / "train_config.yml")  # `magma-hf train` takes it as it is
    assert config.train_dataset_dir == str(output_dir / "data" / "train")
    assert config.freeze_img_encoder is False


def test_text_corpus_asks_the_questions_about_named_numbers():
    corpus = text_corpus(200, seed=0)
    for question in QUESTIONS.values():
        asked = [document for document in corpus if question.prompt in document]
        assert asked
        for document in asked:
            heading = document.split("\n")[0]
            digit = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"].index(heading)
            assert f"{question.prompt} {question.answer(digit)}" in document


def test_output_dir_keeps_what_the_demo_did_not_write(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not written by `magma-hf demo`"):
        prepare_output_dir(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert not (foreign / MARKER).exists()

    previous = tmp_path / "previous"
    (previous / "magma").mkdir(parents=True)
    (previous / MARKER).write_text("")
    (previous / "metrics.json").write_text("{}")
    (previous / "notes.txt").write_text("keep me too")
    prepare_output_dir(previous)
    assert not (previous / "magma").exists() and not (previous / "metrics.json").exists()
    assert (previous / "notes.txt").read_text() == "keep me too"


def test_a_rerun_keeps_files_changed_or_added_in_its_outputs(tmp_path):
    """`magma-hf app demo-output/magma --write-space` (the README's next step) adds the user's files to the demo's
    model folder: today a rerun of the demo deleted the whole folder, their edits included."""
    from magma_hf.demo import write_demo_manifest
    from tests.helpers import files_unchanged

    previous = tmp_path / "previous"
    (previous / "magma").mkdir(parents=True)
    (previous / "magma" / "config.json").write_text("{}")
    (previous / "metrics.json").write_text("{}")
    write_demo_manifest(previous)  # what a complete demo run records at its end
    (previous / "magma" / "app.py").write_text("my Space")
    (previous / "metrics.json").write_text('{"mine": 1}')
    with files_unchanged(previous), pytest.raises(FileExistsError, match=r"magma/app\.py, metrics\.json"):
        prepare_output_dir(previous)
    (previous / "magma" / "app.py").unlink()
    (previous / "metrics.json").write_text("{}")
    prepare_output_dir(previous)
    assert not (previous / "magma").exists() and not (previous / "metrics.json").exists()
