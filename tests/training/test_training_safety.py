"""Training as users break it: `save` over a finished run, a `load` that is not there, `save` being the model it starts
from, a config value of the wrong type, and data whose images are mostly bad (a run that would train on nothing)."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from test_training import tiny_run_config, write_magma_dataset

from magma_hf import cli
from magma_hf.training.run import MagmaTrainingConfig, resolve_checkpoint, train
from tests.helpers import files_unchanged, make_tokenizer, random_image

BAD_JPEG = b"\xff\xd8\xff not really a jpeg"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A saved tiny tokenizer and a dataset in the original layout (20 good images, 1 corrupt)."""
    root = tmp_path_factory.mktemp("safety_assets")
    make_tokenizer().save_pretrained(root / "tokenizer")
    write_magma_dataset(root / "data")
    return root


def run_config(assets: Path, save: Path, **overrides) -> dict:
    """Two steps of the tiny CPU config, random GPT-J, no evaluation: a few seconds."""
    values = tiny_run_config(assets, save, train_steps=2, save_every=2, eval_dataset_pct=0, num_caption_samples=0)
    values["model_config"] = {k: v for k, v in values["model_config"].items() if k != "lm_name"}
    values.update(overrides)
    return values


@pytest.fixture(scope="module")
def finished_run(assets, tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("finished") / "run"
    train(MagmaTrainingConfig.from_dict(run_config(assets, save)))
    assert (save / "model.safetensors").is_file() and (save / "checkpoint-2").is_dir()
    return save


def write_config(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


# ---------------------------------------------------------------------------------------------------------------------
# save and load


@pytest.mark.parametrize("overwrite", [False, True])
def test_save_holding_a_finished_run_is_refused(assets, finished_run, overwrite):
    """A second run into a finished one would replace its model and its checkpoints: refused, overwrite or not (an
    overwrite never replaces another run's checkpoints)."""
    values = run_config(assets, finished_run, **({"overwrite": True} if overwrite else {}))  # (main knows no overwrite)
    config = MagmaTrainingConfig.from_dict(values)
    expected = rf"save {finished_run} holds checkpoints of another run \(checkpoint-2/\).*load: {finished_run}"
    with files_unchanged(finished_run, no_new_files=True), pytest.raises(ValueError, match=expected):
        train(config)


def test_overwrite_replaces_a_runs_outputs_and_keeps_the_users_files(assets, finished_run, tmp_path, capsys):
    """A finished run whose checkpoints were deleted, with the user's notes and model card beside it: refused without
    --overwrite (naming the folder and its files); with it, the run's outputs are replaced and the user's files kept."""
    save = tmp_path / "run"
    shutil.copytree(finished_run, save, ignore=shutil.ignore_patterns("checkpoint-*"))
    (save / "notes.txt").write_text("lr 5e-3 was too high\n")
    (save / "README.md").write_text("# My model card\n")
    (save / "eval_captions.jsonl").write_text('{"step": 2, "generated": "from the earlier run"}\n')
    config = write_config(tmp_path / "cfg.yml", run_config(assets, save, training_args={"use_cpu": True, "seed": 1}))

    with files_unchanged(save, no_new_files=True):
        assert cli.main(["train", str(config)]) == 2
    error = capsys.readouterr().err
    listing = "a finished run (model.safetensors, config.json, adapter_export/, "
    assert f"save {save} is not empty: it holds {listing}" in error
    assert "--overwrite" in error and "Traceback" not in error

    written_by_a_run = [p.name for p in save.iterdir() if p.is_file() and p.name not in ("notes.txt", "README.md")]
    written_by_a_run += [f"adapter_export/{p.name}" for p in (save / "adapter_export").iterdir()]
    before = (save / "model.safetensors").read_bytes()
    with files_unchanged(save, may_change=written_by_a_run):
        assert cli.main(["train", str(config), "--overwrite"]) == 0
    assert (save / "model.safetensors").read_bytes() != before  # replaced by this run's (seed 1)
    assert (save / "checkpoint-2" / "trainer_state.json").is_file()
    assert (save / "eval_captions.jsonl").read_text() == ""  # the earlier run's log is not continued


def test_a_model_no_run_recorded_is_named_before_training(assets, finished_run, tmp_path, capsys):
    """Model files in `save` that no run's manifest lists (the user's, or an older version's that recorded nothing) are
    never replaced, even with --overwrite: the run stops before training, naming them, instead of at its final save."""
    save = tmp_path / "run"
    shutil.copytree(finished_run, save, ignore=shutil.ignore_patterns("checkpoint-*"))
    (save / "magma_model.json").unlink()
    config = write_config(tmp_path / "cfg.yml", run_config(assets, save))
    with files_unchanged(save, no_new_files=True):
        assert cli.main(["train", str(config), "--overwrite"]) == 2
    error = capsys.readouterr().err
    assert "config.json, model.safetensors" in error and "magma_model.json" in error and "Traceback" not in error


@pytest.mark.parametrize(
    "key, overwrite",
    [("model_name_or_path", False), ("model_name_or_path", True), ("tokenizer_name_or_path", True),
     ("train_dataset_dir", True)],
)  # fmt: skip
def test_save_that_is_an_input_is_refused_even_with_overwrite(assets, finished_run, key, overwrite, tmp_path):
    """Finetuning "in place" (save = the model it starts from) would write the new model over the old one; the same
    for the tokenizer's folder and the data's."""
    if key == "model_name_or_path":
        folder = finished_run
        values = {"batch_size": 4, "train_steps": 2, "train_dataset_dir": str(assets / "data"), "save": str(folder),
                  "model_name_or_path": str(folder), "training_args": {"use_cpu": True}}  # fmt: skip
    else:
        folder = tmp_path / key
        shutil.copytree(assets / ("tokenizer" if key == "tokenizer_name_or_path" else "data"), folder)
        values = run_config(assets, folder, **{key: str(folder)})
    if overwrite:
        values["overwrite"] = True
    with (
        files_unchanged(folder, no_new_files=True),
        pytest.raises(ValueError, match=rf"save {folder} is also the run's {key}"),
    ):
        train(MagmaTrainingConfig.from_dict(values))


def test_a_final_save_that_fails_midway_leaves_the_previous_model_whole(assets, finished_run, tmp_path, monkeypatch):
    """Resuming a finished run for one more step, the final save dies after writing part of the weights (a full disk,
    a kill): the earlier model in `save` stays complete; the next attempt saves."""
    from magma_hf.training.trainer import MagmaTrainer

    save = tmp_path / "run"
    shutil.copytree(finished_run, save)
    save_model = MagmaTrainer.save_model

    def dies_midway(self, output_dir=None, _internal_call=False):
        if _internal_call:  # checkpoints
            return save_model(self, output_dir, _internal_call)
        output_dir = Path(output_dir or self.args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "model.safetensors").write_bytes(b"the first bytes of a model")
        raise OSError("No space left on device")

    values = run_config(assets, save, load=str(save), train_steps=3)
    monkeypatch.setattr(MagmaTrainer, "save_model", dies_midway)
    with files_unchanged(save), pytest.raises(OSError, match="No space left"):
        train(MagmaTrainingConfig.from_dict(values))
    monkeypatch.setattr(MagmaTrainer, "save_model", save_model)
    trained = ["model.safetensors", "training_args.bin", *(f"adapter_export/{name}.safetensors" for name in
               ("adapter_model", "image_prefix"))]  # fmt: skip
    trained += ["magma_model.json", "adapter_export/magma_export.json"]  # the manifests: they record those files
    trained.append(".final-model.saving/model.safetensors")  # the failed save's leftover, which the rerun removes
    with files_unchanged(save, may_change=trained):
        train(MagmaTrainingConfig.from_dict(values))
    assert not (save / ".final-model.saving").exists()
    assert json.loads((save / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3


def test_load_that_does_not_exist_is_an_error_naming_it(assets, tmp_path):
    """A typo in `load` must not quietly train from step 0 (into a folder the user believes holds the resumed run)."""
    (tmp_path / "notes.txt").write_text("keep me\n")
    missing = tmp_path / "runs" / "ft-typo"
    config = MagmaTrainingConfig.from_dict(run_config(assets, tmp_path / "out", load=str(missing)))
    with files_unchanged(tmp_path, no_new_files=True), pytest.raises(ValueError, match=rf"load {missing} does not"):
        train(config)


def test_load_without_a_checkpoint_is_an_error_unless_it_is_save(assets, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match=rf"load {empty} holds no checkpoint"):
        resolve_checkpoint(MagmaTrainingConfig.from_dict(run_config(assets, tmp_path / "out", load=str(empty))))
    weights = str(tmp_path / "weights.safetensors")
    with pytest.raises(ValueError, match=r"load .*weights.safetensors is a file"):
        resolve_checkpoint(MagmaTrainingConfig.from_dict(run_config(assets, tmp_path / "o", load=weights)))
    # the documented case: `load: save` (the shipped configs) before anything was saved starts at step 0
    for save in (tmp_path / "new", empty):
        assert resolve_checkpoint(MagmaTrainingConfig.from_dict(run_config(assets, save, load=str(save)))) is None


# ---------------------------------------------------------------------------------------------------------------------
# Training on nothing


def write_dataset_with_bad_images(root: Path, good: int, corrupt: int, missing: int = 0) -> Path:
    """The original layout: `good` images, `corrupt` files that are no image, `missing` samples whose image is gone."""
    (root / "images" / "0").mkdir(parents=True)
    (root / "image_data" / "0").mkdir(parents=True)
    for k in range(good + corrupt + missing):
        name = f"{k}.png" if k < good else f"{k}.jpg"
        if k < good:
            random_image(k, size=(72, 64)).save(root / "images" / "0" / name)
        elif k < good + corrupt:
            (root / "images" / "0" / name).write_bytes(BAD_JPEG)
        sample = {"image_path": f"images/0/{name}", "captions": [f"sample {k}"]}
        (root / "image_data" / "0" / f"{k}.json").write_text(json.dumps(sample))
    return root


def test_a_run_whose_images_are_all_corrupt_stops_with_the_count_and_the_files(assets, tmp_path):
    """Every image is corrupt: the run stops early (it used to 'train' to the end with a loss of 0 and exit 0)."""
    data = write_dataset_with_bad_images(tmp_path / "data", good=0, corrupt=12)
    config = MagmaTrainingConfig.from_dict(
        run_config(assets, tmp_path / "out", train_dataset_dir=str(data), train_steps=50, save_every=100)
    )
    with (
        files_unchanged(data),
        pytest.raises(
            ValueError,
            match=r"Training stopped after 10 steps: 44 of the 44 samples read so far .*were skipped, more "
            r"than max_skipped_share 0.5. First: .*images/0/\d+\.jpg \(cannot decode",
        ),
    ):
        train(config)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_run_that_skips_more_than_its_share_stops_at_the_end_unless_allowed(assets, tmp_path):
    """7 of 10 images corrupt, 8 samples read: too few to stop early, so the end of training decides, before the final
    model is saved; `max_skipped_share: 0.9` lets the same run finish."""
    data = write_dataset_with_bad_images(tmp_path / "data", good=3, corrupt=7)
    values = run_config(assets, tmp_path / "out", train_dataset_dir=str(data))
    expected = r"Training: [5-7] of 8 samples were skipped \(\d+%\), more than max_skipped_share 0.5. First: "
    with files_unchanged(data), pytest.raises(ValueError, match=expected):
        train(MagmaTrainingConfig.from_dict(values))
    assert not (tmp_path / "out" / "model.safetensors").exists()
    trainer = train(MagmaTrainingConfig.from_dict({**values, "save": str(tmp_path / "b"), "max_skipped_share": 0.9}))
    assert trainer.state.global_step == 2 and (tmp_path / "b" / "model.safetensors").is_file()


def test_a_dataset_that_loses_more_than_its_share_when_read_is_an_error(assets, tmp_path):
    """6 of 10 samples name an image that is not there: the error names the count and the first sample files."""
    data = write_dataset_with_bad_images(tmp_path / "data", good=4, corrupt=0, missing=6)
    config = MagmaTrainingConfig.from_dict(run_config(assets, tmp_path / "out", train_dataset_dir=str(data)))
    with (
        files_unchanged(data),
        pytest.raises(
            ValueError,
            match=r"train_dataset_dir: 6 of 10 samples were skipped \(60%\).* First: .*image_data/0/4\.json "
            r"\(missing image: .*4\.jpg does not exist\)",
        ),
    ):
        train(config)


# ---------------------------------------------------------------------------------------------------------------------
# Config values of the wrong type


BASE = {"batch_size": 8, "train_steps": 10, "train_dataset_dir": "d", "save": "s", "model_config": {}}


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("lr", "fast", "a number"),
        ("batch_size", "eight", "an integer"),
        ("train_steps", 10.5, "an integer"),
        ("run_blind", "yes", "true or false"),
        ("eval_dataset_pct", "ten percent", "a number"),
        ("zero_stage", "two", "an integer or null"),
        ("save", 5, "a string or null"),
        ("training_args", ["bf16"], "a mapping"),
        ("adapter_config", "normal", "a mapping or null"),
        ("warmup_num_steps", True, "an integer"),
    ],
)
def test_a_config_value_of_the_wrong_type_names_the_key_and_the_type(key, value, expected):
    with pytest.raises(ValueError, match=rf"Config key {key} must be {expected}, got {value!r}".replace("[", r"\[")):
        MagmaTrainingConfig.from_dict({**BASE, key: value})


def test_training_args_are_checked_as_trainingarguments_does_not():
    """`TrainingArguments(bf16="no")` turns bf16 on, and `bf17` is a TypeError from deep inside its __init__."""
    with pytest.raises(ValueError, match=r"Config key training_args.bf16 must be true or false, got 'no' \(str\)"):
        MagmaTrainingConfig.from_dict({**BASE, "training_args": {"bf16": "no"}})
    with pytest.raises(
        ValueError, match=r"training_args.bf17 is not a TrainingArguments setting \(did you mean bf16\?\)"
    ):
        MagmaTrainingConfig.from_dict({**BASE, "training_args": {"bf17": True}})
    config = MagmaTrainingConfig.from_dict({**BASE, "training_args": {"adam_epsilon": "1e-8", "report_to": ["none"]}})
    assert config.training_args == {"adam_epsilon": 1e-8, "report_to": ["none"]}


def test_a_float_yaml_reads_as_a_string_is_taken_as_the_number(tmp_path):
    """YAML 1.1 wants a dot in a float: `lr: 1e-4` is the string '1e-4' to PyYAML, and meant as the number."""
    path = write_config(tmp_path / "c.yml", BASE)
    path.write_text(path.read_text() + "lr: 1e-4\nmin_lr: 0\n")
    config = MagmaTrainingConfig.from_yaml(path)
    assert config.lr == 1e-4 and isinstance(config.lr, float) and config.min_lr == 0.0


def test_cli_names_the_bad_override_in_one_line(assets, tmp_path, capsys):
    config = write_config(tmp_path / "cfg.yml", run_config(assets, tmp_path / "out"))
    with files_unchanged(tmp_path, no_new_files=True):
        assert cli.main(["train", str(config), "lr=fast"]) == 2
    error = capsys.readouterr().err
    assert error.strip() == "error: Config key lr must be a number, got 'fast' (str)"


def test_cli_names_a_missing_or_broken_config_file(tmp_path, capsys):
    broken = tmp_path / "broken.yml"
    broken.write_text("batch_size: 8\ntrain_steps: [10\n")
    assert cli.main(["train", str(tmp_path / "nope.yml")]) == 2
    assert capsys.readouterr().err.strip() == f"error: Config file {tmp_path / 'nope.yml'} does not exist"
    assert cli.main(["train", str(broken)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {broken} is not valid YAML: ") and "line 3" in error


def test_load_save_continues_a_run_killed_before_its_first_checkpoint(assets, tmp_path):
    """Killed after an evaluation logged captions and while a checkpoint and an export were being written, before any
    checkpoint was complete: the same command (load: save) starts that run again at step 0 in its folder, no
    overwrite needed, and leaves no leftover of its own."""
    from magma_hf.training.export import export_staging_name
    from magma_hf.training.trainer import CAPTIONS_LOG_NAME

    save = tmp_path / "run"
    (save / "tmp-checkpoint-250" / "checkpoint-250").mkdir(parents=True)
    (save / export_staging_name("adapter_export")).mkdir()
    (save / CAPTIONS_LOG_NAME).write_text('{"step": 1, "generated": "from the killed run"}\n')
    train(MagmaTrainingConfig.from_dict(run_config(assets, save, load=str(save))))
    assert (save / "checkpoint-2" / "trainer_state.json").is_file() and (save / "model.safetensors").is_file()
    assert not (save / "tmp-checkpoint-250").exists() and not (save / export_staging_name("adapter_export")).exists()


def test_load_of_an_incomplete_checkpoint_is_a_config_error_in_one_line(assets, tmp_path, capsys):
    save = tmp_path / "run"
    (save / "checkpoint-4").mkdir(parents=True)  # no trainer_state.json: a save that was cut short
    config = write_config(tmp_path / "cfg.yml", run_config(assets, save, load=str(save / "checkpoint-4")))
    with files_unchanged(tmp_path, no_new_files=True):
        assert cli.main(["train", str(config)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: load: Cannot resume from {save / 'checkpoint-4'}") and "Traceback" not in error
    assert "Skipping" not in error  # no warning that contradicts the error


def test_a_bad_adapter_config_for_an_existing_model_is_one_line(assets, finished_run, tmp_path, capsys):
    values = run_config(assets, tmp_path / "out", model_name_or_path=str(finished_run))
    del values["model_config"]
    values["adapter_config"] = {"ffn": {"adapter_type": "normal", "downsample_factor": 4}}
    config = write_config(tmp_path / "cfg.yml", values)
    assert cli.main(["train", str(config)]) == 2
    error = capsys.readouterr().err
    assert error.strip().splitlines()[-1] == (
        "error: adapter_config has unknown locations ['ffn']; expected ['mlp', 'attention']"
    ) and "Traceback" not in error
