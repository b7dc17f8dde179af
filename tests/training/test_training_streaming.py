"""Training on streamed data: shards read where they lie, split over 2 processes x 2 data-loader workers under
`accelerate launch` (DDP, and DeepSpeed ZeRO-2): every sample once per pass, a SIGKILL between checkpoints resumed
exactly from each process's data-loader state, nothing copied into the 🤗 datasets cache. In one process: which data
streams, a mix of two streams with evaluation from a stream, bad samples counted, and the config and resume errors,
each in one line."""

import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import yaml
from test_training import CONFIGS, REPO, write_magma_dataset

from magma_hf import cli
from magma_hf.data.streaming import DEFAULT_SHUFFLE_BUFFER_SIZE, MagmaStream
from magma_hf.training.collator import MagmaDataCollator
from magma_hf.training.run import MagmaTrainingConfig, build_datasets, train
from magma_hf.training.trainer import DATA_STATE_DIR
from tests.helpers import accelerate_launch, encoded_image, files_unchanged, make_tokenizer, write_webdataset_shards

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HOOKED_TRAIN = Path(__file__).parent / "train_with_test_hooks.py"
ZERO2 = CONFIGS / "accelerate" / "cpu_deepspeed_zero2.yaml"
# 8 shards of 6 over 4 readers (2 processes x 2 workers): 12 samples each, 6 batches of 2 per worker, so a pass over
# the 48 samples is 12 optimizer steps of 4. Killed in the forward of step 10: steps 1-9 done, checkpoint-5 the last.
SHARDS, PER_SHARD, PASS_STEPS = 8, 6, 12
TRAIN_STEPS, SAVE_EVERY, KILL_AT = 14, 5, 10


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Training shards (their keys as the stream names them), evaluation shards, a second source for a mix, a tokenizer
    and an empty 🤗 datasets cache."""
    root = tmp_path_factory.mktemp("streamed")
    keys = write_webdataset_shards(root / "train", shards=SHARDS, per_shard=PER_SHARD)
    write_webdataset_shards(root / "eval", shards=1, per_shard=6, first_seed=1000)
    write_webdataset_shards(root / "other", shards=2, per_shard=4, first_seed=2000)
    make_tokenizer().save_pretrained(root / "tokenizer")
    (root / "hf_datasets_cache").mkdir()
    return root, [f"0:{key}" for key in keys]


def streamed_values(root: Path, save: Path, **overrides) -> dict:
    """train_tiny_cpu.yml on the training shards, evaluated on the evaluation shards; shuffled in windows of 4."""
    values = yaml.safe_load((CONFIGS / "train_tiny_cpu.yml").read_text())
    values.update(
        train_dataset_dir=str(root / "train"),
        eval_dataset_dir=str(root / "eval"),
        tokenizer_name_or_path=str(root / "tokenizer"),
        save=str(save),
        shuffle_buffer_size=4,
        num_caption_samples=0,
    )
    values.update(overrides)
    return values


# ---------------------------------------------------------------------------------------------------------------------
# 2 processes x 2 data-loader workers under accelerate launch


@pytest.fixture(scope="module")
def launched_config(data) -> Path:
    root, _ = data
    values = streamed_values(root, root / "unused", train_steps=TRAIN_STEPS, save_every=SAVE_EVERY, eval_every=7)
    values["training_args"]["dataloader_num_workers"] = 2
    values.pop("save")
    path = root / "streamed.yml"
    path.write_text(yaml.safe_dump(values))
    return path


def launch(data, config: Path, run: Path, name: str, config_file=None, kill_at: int | None = None) -> dict:
    """`magma-hf train` (with the test hooks) over 2 CPU processes, `load: save` as the shipped configs; killed in the
    forward of step `kill_at` if given. Returns the logged losses by step, each process's trained keys by step and the
    output."""
    root, _ = data
    logs = root / name
    env = {"MAGMA_TEST_LOSS_LOG": f"{logs}.losses", "MAGMA_TEST_KEY_LOG": f"{logs}.keys",
           "HF_DATASETS_CACHE": str(root / "hf_datasets_cache")}  # fmt: skip
    if kill_at:
        env["MAGMA_TEST_KILL_AT_STEP"] = str(kill_at)
    command = [str(HOOKED_TRAIN), "train", str(config), f"save={run}", f"load={run}"]
    result = accelerate_launch(command, cwd=REPO, config_file=config_file, env=env, timeout=600)
    output = result.stdout + result.stderr
    if kill_at:
        assert result.returncode != 0 and "SIGKILL" in output, output[-5000:]
    else:
        assert result.returncode == 0, output[-5000:]
    lines = [json.loads(line) for line in Path(f"{logs}.losses").read_text().splitlines()]
    keys = {}
    for rank in range(2):
        entries = [json.loads(line) for line in Path(f"{logs}.keys.rank{rank}").read_text().splitlines()]
        keys[rank] = {entry["step"]: entry["keys"] for entry in entries}
    return {"losses": {line["step"]: line["loss"] for line in lines}, "keys": keys, "output": output}


@pytest.fixture(scope="module")
def uninterrupted(data, launched_config) -> dict:
    root, _ = data
    return launch(data, launched_config, root / "uninterrupted", "uninterrupted")


def assert_resumed_exactly(killed: dict, resumed: dict, reference: dict, exact_steps) -> None:
    """The resumed run starts after checkpoint-SAVE_EVERY; its losses on `exact_steps` and the killed run's equal the
    reference run's within 1e-6, and each process trained on the reference's batches, step by step: no sample
    skipped, none seen twice."""
    assert sorted(killed["losses"]) == list(range(1, KILL_AT))
    assert sorted(resumed["losses"]) == list(range(SAVE_EVERY + 1, TRAIN_STEPS + 1))
    for step in range(1, KILL_AT):
        assert killed["losses"][step] == pytest.approx(reference["losses"][step], abs=1e-6), step
    for step in exact_steps:
        assert resumed["losses"][step] == pytest.approx(reference["losses"][step], abs=1e-6), step
    for rank in range(2):
        done = {step: keys for step, keys in killed["keys"][rank].items() if step <= SAVE_EVERY}
        assert done | resumed["keys"][rank] == reference["keys"][rank], rank


def assert_data_state(checkpoint: Path) -> None:
    for rank in range(2):
        state = json.loads((checkpoint / DATA_STATE_DIR / f"process-{rank}.json").read_text())
        assert (state["process"], state["processes"], state["dataloader_num_workers"]) == (rank, 2, 2)
        assert state["shards"] == [SHARDS] and state["shuffle_buffer_size"] == 4 and state["seed"] == 0
        workers = state["loader"]["_snapshot"]["_worker_snapshots"]  # torchdata's: each worker's stream position
        readers = [workers[f"worker_{w}"]["dataset_state"]["placement"]["reader"] for w in (0, 1)]
        assert readers == [2 * rank, 2 * rank + 1]


@pytest.mark.slow
def test_ddp_reads_every_sample_once_per_pass_and_resumes_a_kill_exactly(data, launched_config, uninterrupted):
    """Plain DDP. The uninterrupted run's first 12 steps hold each of the 48 samples exactly once; it evaluates on the
    streamed evaluation shards and leaves the 🤗 datasets cache empty. A run killed between checkpoint-5 and
    checkpoint-10 (mid-pass), then the same command again, gives the uninterrupted losses and batches at every step."""
    root, keys = data
    batches = uninterrupted["keys"]
    first_pass = [key for rank in range(2) for step in range(1, PASS_STEPS + 1) for key in batches[rank][step]]
    assert Counter(first_pass) == Counter(keys)
    second_pass = [key for rank in range(2) for step in (13, 14) for key in batches[rank][step]]
    assert len(set(second_pass)) == len(second_pass) == 8 and set(second_pass) <= set(keys)
    assert uninterrupted["output"].count("'eval_loss'") == 2  # steps 7 and 14, on the streamed evaluation shards
    assert not any((root / "hf_datasets_cache").rglob("*"))

    run = root / "ddp"
    killed = launch(data, launched_config, run, "ddp_killed", kill_at=KILL_AT)
    assert sorted(path.name for path in run.glob("checkpoint-*")) == [f"checkpoint-{SAVE_EVERY}"]
    assert_data_state(run / f"checkpoint-{SAVE_EVERY}")
    resumed = launch(data, launched_config, run, "ddp_resumed")
    assert_resumed_exactly(killed, resumed, uninterrupted, range(SAVE_EVERY + 1, TRAIN_STEPS + 1))
    assert not any((root / "hf_datasets_cache").rglob("*"))


@pytest.mark.slow
def test_deepspeed_zero2_resumes_a_kill_exactly(data, launched_config, uninterrupted):
    """DeepSpeed ZeRO-2 (configuration/accelerate/cpu_deepspeed_zero2.yaml), killed as above and run again: the losses
    of the steps both runs trained (6-9) are equal, and the batches of every step are the DDP run's (the data order
    does not depend on the backend). Its losses differ from DDP's in the sixth digit (reduction order), so the last
    steps have no reference here: a third launch would cost 40 s."""
    root, _ = data
    run = root / "zero2"
    killed = launch(data, launched_config, run, "zero2_killed", config_file=ZERO2, kill_at=KILL_AT)
    assert (run / f"checkpoint-{SAVE_EVERY}" / f"global_step{SAVE_EVERY}").is_dir()  # DeepSpeed's own checkpoint
    assert_data_state(run / f"checkpoint-{SAVE_EVERY}")
    resumed = launch(data, launched_config, run, "zero2_resumed", config_file=ZERO2)
    reference = {"losses": killed["losses"], "keys": uninterrupted["keys"]}
    assert_resumed_exactly(killed, resumed, reference, range(SAVE_EVERY + 1, KILL_AT))
    assert not any((root / "hf_datasets_cache").rglob("*"))


# ---------------------------------------------------------------------------------------------------------------------
# One process


def test_which_data_streams_and_what_evaluation_reads(data, tmp_path, caplog):
    """Shards stream (seeded with the run's seed, endless) and a folder of files does not, unless `streaming: true`;
    with a streamed training set and no eval_dataset_dir nothing is split off (one line says so); streamed evaluation
    is the first samples of the evaluation shards, in order, with every caption, held in memory."""
    root, _ = data
    folder = write_magma_dataset(tmp_path / "magma", n=4, corrupt=False)
    base = streamed_values(root, tmp_path / "out", eval_dataset_dir=None)
    base.pop("shuffle_buffer_size")
    with caplog.at_level("INFO", logger="magma_hf.training.run"):
        train_set, evaluation = build_datasets(MagmaTrainingConfig.from_dict(base), seed=7, eval_samples=4)
    assert isinstance(train_set, MagmaStream) and evaluation is None
    assert (train_set.seed, train_set.repeat, train_set.shuffle_buffer_size) == (7, True, DEFAULT_SHUFFLE_BUFFER_SIZE)
    assert any("no evaluation" in record.getMessage() for record in caplog.records)

    map_style, _ = build_datasets(MagmaTrainingConfig.from_dict({**base, "train_dataset_dir": str(folder)}), 7, 4)
    assert len(map_style) == 3  # 4 samples, eval_dataset_pct 0.2 split off: as before
    streamed = {**base, "train_dataset_dir": str(folder), "streaming": True, "eval_dataset_dir": str(root / "eval")}
    train_set, evaluation = build_datasets(MagmaTrainingConfig.from_dict(streamed), 7, 4)
    assert isinstance(train_set, MagmaStream)  # the folder as ranges of its rows
    assert [row["key"] for row in evaluation] == [f"0:00000.tar/00000{k:04d}" for k in range(4)]
    assert [row["captions"] for row in evaluation] == [[f"image {1000 + k}"] for k in range(4)]
    assert all(row["image"] is not None for row in evaluation)


@pytest.fixture(scope="module")
def mixed_run(data, tmp_path_factory):
    """One process trains 4 steps on a mix of two streams (weights 3:1), evaluating every 2 steps on the first 4
    evaluation samples; the keys of its training batches, in order."""
    root, _ = data
    save = tmp_path_factory.mktemp("mixed") / "run"
    values = streamed_values(
        root, save, train_dataset_dir=[str(root / "train"), str(root / "other")], train_dataset_weights=[3, 1],
        train_steps=4, save_every=2, eval_every=2, num_caption_samples=1,
    )  # fmt: skip
    seen = []
    collate = MagmaDataCollator.__call__

    def recording(self, samples):
        if self.caption_choice == "random":  # training batches (evaluation's take the first caption)
            seen.extend(sample["key"] for sample in samples)
        return collate(self, samples)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MagmaDataCollator, "__call__", recording)
        trainer = train(MagmaTrainingConfig.from_dict(values))
    return trainer, values, seen


def test_a_mix_of_two_streams_trains_and_evaluates_on_a_stream(mixed_run):
    trainer, values, seen = mixed_run
    assert isinstance(trainer.train_dataset, MagmaStream) and trainer.train_dataset.weights == [0.75, 0.25]
    sources = Counter(key.split(":")[0] for key in seen)
    assert len(seen) == 16 and sources["0"] > sources["1"] > 0, sources
    assert isinstance(trainer.eval_dataset, list) and len(trainer.eval_dataset) == 4  # eval_steps x batch_size
    assert [entry["step"] for entry in trainer.state.log_history if "eval_loss" in entry] == [2, 4]
    captions = [json.loads(line) for line in (Path(values["save"]) / "eval_captions.jsonl").read_text().splitlines()]
    assert [entry["references"] for entry in captions] == [["image 1000"]] * 2
    state = json.loads((Path(values["save"]) / "checkpoint-4" / DATA_STATE_DIR / "process-0.json").read_text())
    assert (state["processes"], state["dataloader_num_workers"], state["shards"]) == (1, 0, [SHARDS, 2])


def write_config(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize(
    "change, expected",
    [
        ("workers", "it was saved with dataloader_num_workers 0, this run has dataloader_num_workers 1. Resume with "
                    "the same processes, dataloader_num_workers, seed and data"),
        ("processes", "it was saved with processes 2, this run has processes 1. "),
        ("no data state", f"it has no {DATA_STATE_DIR}/ (a checkpoint of a run whose training data was not streamed"),
    ],
    ids=["workers", "processes", "no data state"],
)  # fmt: skip
def test_resuming_a_stream_otherwise_is_an_error_in_one_line(mixed_run, tmp_path, capsys, change, expected):
    """Resumed with another data-loader worker count, by another process count, or from a checkpoint without a data
    state: one line naming what differs, and nothing written."""
    _, values, _ = mixed_run
    run = tmp_path / "run"
    shutil.copytree(values["save"], run)
    state = run / "checkpoint-4" / DATA_STATE_DIR
    training_args = dict(values["training_args"])
    if change == "workers":
        training_args["dataloader_num_workers"] = 1
    elif change == "processes":
        saved = json.loads((state / "process-0.json").read_text())
        (state / "process-0.json").write_text(json.dumps({**saved, "processes": 2}))
    else:
        shutil.rmtree(state)
    config = write_config(tmp_path / "cfg.yml", {**values, "save": str(run), "load": str(run), "train_steps": 6,
                                                 "training_args": training_args})  # fmt: skip
    with files_unchanged(run, no_new_files=True):
        assert cli.main(["train", str(config)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: Cannot resume the streamed training data from {run / 'checkpoint-4'}: ")
    assert expected in error


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train_dataset_weights=[1, 2, 3]",
         "train_dataset_weights has 3 weights for 2 train_dataset_dir sources: give one weight per source"),
        ("train_dataset_weights=[1, lots]", "Config key train_dataset_weights[1] must be a number, got 'lots' (str)"),
        ("train_dataset_weights=[0, 0]",
         "train_dataset_weights must be non-negative numbers with a positive sum, got [0.0, 0.0]"),
        ("streaming=sometimes", "Config key streaming must be true or false or null, got 'sometimes' (str)"),
        ("shuffle_buffer_size=-1", "shuffle_buffer_size must be >= 0 (0 reads in order), got -1"),
        ("train_dataset_dir=[{path: TRAIN, streaming: sometimes}, OTHER]",
         "train_dataset_dir: Dataset source TRAIN: streaming must be true or false, got 'sometimes'"),
    ],
    ids=["weights count", "weight not a number", "weights sum 0", "streaming", "shuffle buffer", "source streaming"],
)  # fmt: skip
def test_stream_config_errors_are_one_line(data, tmp_path, capsys, override, expected):
    root, _ = data
    values = streamed_values(root, tmp_path / "out", train_dataset_dir=[str(root / "train"), str(root / "other")])
    config = write_config(tmp_path / "cfg.yml", values)
    override = override.replace("TRAIN", str(root / "train")).replace("OTHER", str(root / "other"))
    assert cli.main(["train", str(config), override]) == 2
    error = capsys.readouterr().err
    assert error.strip().splitlines()[-1] == f"error: {expected.replace('TRAIN', str(root / 'train'))}"
    assert "Traceback" not in error
    assert not (tmp_path / "out").exists()


def write_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for extension, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_bad_streamed_samples_are_skipped_counted_and_named(data, tmp_path):
    """Streamed samples that cannot be used are skipped by the collator and counted as undecodable images are: 2 bad
    of 12 in one pass are counted and the run finishes; a stream of bad samples only stops the run with the count and
    the first keys with their problems."""
    root, _ = data
    good = {f"g{k:02d}": {"jpg": encoded_image(k), "txt": f"image {k}".encode()} for k in range(10)}
    (tmp_path / "some").mkdir()
    write_shard(tmp_path / "some" / "00000.tar", {**good, "corrupt": {"jpg": b"no jpeg", "txt": b"x"},
                                                  "textonly": {"txt": b"no image"}})  # fmt: skip
    values = streamed_values(root, tmp_path / "a", train_dataset_dir=str(tmp_path / "some"), eval_dataset_dir=None,
                             train_steps=3, save_every=10, eval_every=10)  # fmt: skip
    trainer = train(MagmaTrainingConfig.from_dict(values))
    assert trainer.total_skipped_samples == 2 and trainer.training_samples_read == 12

    (tmp_path / "bad").mkdir()
    write_shard(tmp_path / "bad" / "00000.tar", {"corrupt": {"jpg": b"no jpeg", "txt": b"x"},
                                                 "textonly": {"txt": b"no image"}})  # fmt: skip
    values.update(train_dataset_dir=str(tmp_path / "bad"), save=str(tmp_path / "b"), train_steps=50)
    expected = (
        r"Training stopped after 10 steps: 44 of the 44 samples read so far \(this process\) were skipped, more than "
        r"max_skipped_share 0.5. First: 0:00000.tar/"
    )
    with pytest.raises(ValueError, match=expected) as error:
        train(MagmaTrainingConfig.from_dict(values))
    assert "0:00000.tar/corrupt (cannot decode the image" in str(error.value)
    assert "0:00000.tar/textonly (missing image: no jpg/jpeg/png/webp member)" in str(error.value)
