"""The training stream: every sample once per pass over processes and workers, deterministic shuffling, mixing by
weights, exact resume from a StatefulDataLoader state, and bad samples handled as the map-style readers handle them."""

import io
import json
import tarfile
from collections import Counter

import pytest
from torchdata.stateful_dataloader import StatefulDataLoader

from magma_hf.data.shards import TarShards, list_shards
from magma_hf.data.streaming import MagmaStream, build_stream
from tests.helpers import encoded_image, write_webdataset_shards


def keys_of(batch):
    return [row["key"] for row in batch]


def read_keys(stream, workers: int, rank: int = 0, world: int = 1) -> list[str]:
    stream.distribute(rank, world)
    loader = StatefulDataLoader(stream, batch_size=3, num_workers=workers, collate_fn=keys_of)
    return [key for batch in loader for key in batch]


def read_first(stream, workers: int, rank: int, world: int, count: int) -> list[str]:
    """The keys of the first `count` rows an endless stream gives process `rank` of `world`."""
    stream.distribute(rank, world)
    loader = StatefulDataLoader(stream, batch_size=1, num_workers=workers, collate_fn=keys_of)
    batches = iter(loader)
    return [next(batches)[0] for _ in range(count)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wds")
    keys = write_webdataset_shards(folder, shards=5, per_shard=7)
    return folder, keys


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("buffer", [0, 4])
def test_one_pass_over_two_processes_reads_every_sample_once(shards, workers, buffer):
    folder, keys = shards
    seen = []
    for rank in range(2):
        stream = build_stream(str(folder), repeat=False, shuffle_buffer_size=buffer, seed=3)
        seen += read_keys(stream, workers, rank, 2)
    assert Counter(seen) == Counter(f"0:{key}" for key in keys)  # 35 samples, 5 shards over 4 readers: none twice


def test_fewer_shards_than_readers_splits_shards_by_sample(tmp_path, caplog):
    keys = write_webdataset_shards(tmp_path, shards=1, per_shard=9)
    seen = []
    for rank in range(2):
        stream = build_stream(str(tmp_path), repeat=False, shuffle_buffer_size=0)
        stream.distribute(rank, 2)
        stream.check_readers(num_workers=2)
        seen += read_keys(stream, 2, rank, 2)
    assert sorted(seen) == sorted(f"0:{key}" for key in keys)


def test_shuffling_is_deterministic_and_differs_by_seed_and_pass(shards):
    folder, keys = shards

    def first_passes(seed):
        stream = build_stream(str(folder), shuffle_buffer_size=4, seed=seed)
        rows = iter(stream)
        return [next(rows)["key"] for _ in range(2 * len(keys))]

    a, b = first_passes(1), first_passes(1)
    assert a == b
    assert a != first_passes(2)
    assert a[: len(keys)] != a[len(keys) :]  # the second pass is shuffled anew
    assert sorted(a[: len(keys)]) == sorted(a[len(keys) :]) == sorted(f"0:{key}" for key in keys)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_a_loader_state_continues_exactly(shards, workers):
    folder, _ = shards

    def loader():
        stream = build_stream(str(folder), shuffle_buffer_size=4, seed=5)
        return StatefulDataLoader(stream, batch_size=3, num_workers=workers, collate_fn=keys_of)

    whole = loader()
    batches = iter(whole)
    expected = [next(batches) for _ in range(30)]  # past the end of the first pass (35 samples)
    first = loader()
    batches = iter(first)
    head = [next(batches) for _ in range(11)]
    state = first.state_dict()
    del batches, first
    resumed = loader()
    resumed.load_state_dict(state)
    batches = iter(resumed)
    tail = [next(batches) for _ in range(19)]
    assert head + tail == expected


def test_resume_with_other_workers_is_refused_naming_them(shards):
    folder, _ = shards
    stream = build_stream(str(folder), seed=5)
    first = StatefulDataLoader(stream, batch_size=2, num_workers=0, collate_fn=keys_of)
    batches = iter(first)
    next(batches)
    state = first.state_dict()
    resumed = StatefulDataLoader(build_stream(str(folder), seed=6), batch_size=2, collate_fn=keys_of)
    resumed.load_state_dict(state)
    with pytest.raises(ValueError, match="Cannot resume this data stream.*same processes, dataloader_num_workers"):
        next(iter(resumed))


def test_a_mix_draws_its_sources_in_proportion(tmp_path):
    write_webdataset_shards(tmp_path / "a", shards=2, per_shard=5)
    write_webdataset_shards(tmp_path / "b", shards=2, per_shard=5, first_seed=100)
    stream = build_stream([str(tmp_path / "a"), str(tmp_path / "b")], weights=[3, 1], seed=0, shuffle_buffer_size=0)
    rows = iter(stream)
    counts = Counter(next(rows)["key"].split(":")[0] for _ in range(2000))
    # binomial(2000, 0.75): standard deviation 19.4; 4 of them either way
    assert abs(counts["0"] - 1500) < 78, counts


def test_bad_samples_are_yielded_with_their_problem(tmp_path):
    path = tmp_path / "00000.tar"
    members = [
        ("good.jpg", encoded_image(0)), ("good.txt", b"a good one"),
        ("corrupt.jpg", b"not an image"), ("corrupt.txt", b"corrupt"),
        ("latin.jpg", encoded_image(1)), ("latin.txt", b"caf\xe9"),
        ("nocaption.jpg", encoded_image(2)),
        ("noimage.txt", b"only text"),
    ]  # fmt: skip
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    rows = {row["key"].split("/")[-1]: row for row in build_stream(str(path), repeat=False, shuffle_buffer_size=0)}
    assert rows["good"]["problem"] is None and rows["good"]["captions"] == ["a good one"]
    assert rows["good"]["image"].size == (24, 20)
    assert rows["corrupt"]["image"] is None and "cannot decode the image" in rows["corrupt"]["problem"]
    assert "latin.txt is not valid UTF-8 (line 1, byte 3" in rows["latin"]["problem"]
    assert rows["nocaption"]["problem"] == "no captions"
    assert rows["noimage"]["problem"].startswith("missing image")


def test_a_truncated_last_shard_is_read_to_its_last_whole_sample(tmp_path, caplog):
    keys = write_webdataset_shards(tmp_path, shards=1, per_shard=6)
    path = tmp_path / "00000.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with caplog.at_level("WARNING", logger="magma_hf.data"):
        rows = list(build_stream(str(path), repeat=False, shuffle_buffer_size=0))
    assert 0 < len(rows) < len(keys) and all(row["problem"] is None for row in rows)
    assert [row["key"] for row in rows] == [f"0:{key}" for key in keys[: len(rows)]]
    assert any("is truncated" in r.getMessage() and "00000.tar" in r.getMessage() for r in caplog.records)


def test_a_shard_that_is_not_a_tar_is_named(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"this is no tar file" * 40)
    with pytest.raises(ValueError, match=r"Cannot read the shard .*00000.tar"):
        list(build_stream(str(tmp_path), repeat=False))


def test_shard_names_as_webdataset_writes_them(tmp_path):
    write_webdataset_shards(tmp_path, shards=3, per_shard=1)
    assert [p.rsplit("/", 1)[-1] for p in list_shards(str(tmp_path / "{00000..00002}.tar"))] == [
        "00000.tar", "00001.tar", "00002.tar",
    ]  # fmt: skip
    assert len(list_shards(str(tmp_path / "*.tar"))) == 3
    with pytest.raises(FileNotFoundError, match=r"1 of its 4 shards do not exist, first \['.*00003.tar'\]"):
        list_shards(str(tmp_path / "{00000..00003}.tar"))


def test_a_streamed_tar_is_not_copied(shards, tmp_path, monkeypatch):
    import datasets

    folder, keys = shards
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # read when a dataset is built
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    rows = list(MagmaStream([TarShards("wds", list_shards(str(folder)))], repeat=False))
    assert len(rows) == len(keys)
    assert not any(tmp_path.rglob("*"))
    assert json.loads(rows[0]["metadata"])["key"] in rows[0]["key"]


def test_an_empty_shard_leaves_its_reader_waiting_for_the_next_pass(tmp_path):
    """img2dataset writes an empty tar where every url of a shard failed: its reader goes on to the next pass."""
    keys = write_webdataset_shards(tmp_path, shards=3, per_shard=4)
    with tarfile.open(tmp_path / "00003.tar", "w"):
        pass
    stream = build_stream(str(tmp_path), seed=1, shuffle_buffer_size=2)
    seen = read_first(stream, workers=2, rank=1, world=2, count=3 * len(keys))
    assert set(seen) <= {f"0:{key}" for key in keys} and len(seen) == 3 * len(keys)


def test_a_source_too_small_for_its_readers_is_named(tmp_path):
    with tarfile.open(tmp_path / "00000.tar", "w"):
        pass
    with pytest.raises(ValueError, match=r"reader 0 of 1 .* got no sample in 17 passes in a row"):
        next(iter(build_stream(str(tmp_path))))


def test_a_dataset_streamed_by_datasets_with_its_column_mapping(tmp_path):
    """`{"format": "hub", "path": <name or folder>}` streams through `load_dataset(..., streaming=True)`: its shards
    (here the folder's two parquet files) dealt to readers like tar shards, the column mapping applied."""
    import datasets

    for part in range(2):
        rows = {
            "picture": [{"bytes": encoded_image(10 * part + i), "path": None} for i in range(3)],
            "description": [f"image {10 * part + i}" for i in range(3)],
        }
        features = datasets.Features({"picture": datasets.Image(), "description": datasets.Value("string")})
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / f"part-{part}.parquet"))
    source = {"path": str(tmp_path), "format": "hub", "image_column": "picture", "caption_column": "description"}
    seen = []
    for rank in range(2):
        stream = build_stream(source, repeat=False, shuffle_buffer_size=0)
        assert len(stream.sources[0]) == 2
        stream.distribute(rank, 2)
        seen += [(row["captions"][0], row["image"].size) for row in stream]
    assert sorted(seen) == sorted((f"image {n}", (24, 20)) for n in (0, 1, 2, 10, 11, 12))
