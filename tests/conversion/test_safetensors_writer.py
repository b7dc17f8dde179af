"""The streaming safetensors writer on its own: tiny tensors, no MAGMA."""

import json
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from magma_hf.conversion.safetensors_writer import (
    MappedFile,
    SafetensorsWriteError,
    TensorSpec,
    VerifyReport,
    part_tensor,
    safetensors_header,
    verify_shard,
    write_safetensors_file,
    write_sharded_safetensors,
)
from tests.helpers import files_unchanged

SHARD_BYTES = 8000  # two of the 4000-byte tensors below per shard


@pytest.fixture
def source(tmp_path):
    """A torch.save file, memory-mapped: tensors whose bytes can be copied file to file."""
    path = tmp_path / "source" / "tensors.pt"
    path.parent.mkdir()
    torch.save({"a": torch.arange(1000.0), "d": torch.arange(500, dtype=torch.int64)}, path)
    loaded = torch.load(path, mmap=True, weights_only=True)
    with MappedFile(path) as mapped:
        yield loaded, mapped


def expected_tensors(loaded) -> dict[str, torch.Tensor]:
    return {
        "a": loaded["a"],
        "b": torch.linspace(-1, 1, 1000),
        "c": torch.cat([torch.ones(600), torch.zeros(400)]).view(10, 100),  # two parts: values, then zero padding
        "d": loaded["d"],
    }


def specs_and_produce(loaded, mapped, fail_at: str | None = None):
    expected = expected_tensors(loaded)
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in expected.items()]

    def produce(spec):
        if spec.name == fail_at:
            raise RuntimeError(f"cannot produce {spec.name}")
        if spec.name == "c":
            return [torch.ones(600), torch.zeros(400)]
        tensor = expected[spec.name]
        return [mapped.slice_of(tensor) or tensor]

    return specs, produce, expected


def bitwise_check(expected):
    def check(spec, written):
        same = written.reshape(-1).view(torch.uint8).equal(expected[spec.name].reshape(-1).view(torch.uint8))
        return None if same else (written.double() - expected[spec.name].double()).abs().max().item()

    return check


def test_mapped_file_locates_tensors_in_the_file_and_releases_only_its_pages(tmp_path):
    path = tmp_path / "t.pt"
    torch.save({"a": torch.arange(5000.0), "b": torch.arange(7, dtype=torch.int64)}, path)
    loaded = torch.load(path, mmap=True, weights_only=True)
    in_memory = torch.arange(5000.0)
    with MappedFile(path) as checkpoint:
        for tensor in loaded.values():  # the bytes at the reported offset are the tensor's
            found = checkpoint.slice_of(tensor)
            with open(path, "rb") as stream:
                stream.seek(found.offset)
                assert stream.read(found.nbytes) == tensor.numpy().tobytes()
        assert checkpoint.slice_of(in_memory) is None
        checkpoint.release(loaded["a"], in_memory)
    assert torch.equal(loaded["a"], torch.arange(5000.0)) and torch.equal(in_memory, torch.arange(5000.0))


def test_shards_split_as_asked_with_a_correct_index(tmp_path, source):
    loaded, mapped = source
    specs, produce, expected = specs_and_produce(loaded, mapped)
    folder = tmp_path / "out"
    folder.mkdir()
    written_in_order = []
    result = write_sharded_safetensors(
        folder,
        specs,
        produce,
        SHARD_BYTES,
        check=bitwise_check(expected),
        written=lambda spec: written_in_order.append(spec.name),
        total_parameters=3500,
    )
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert result.filename_to_tensors == {shards[0]: ["a", "b"], shards[1]: ["c", "d"]}
    assert sorted(path.name for path in folder.iterdir()) == [*shards, "model.safetensors.index.json"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"a": shards[0], "b": shards[0], "c": shards[1], "d": shards[1]}
    assert index["metadata"] == {"total_parameters": 3500, "total_size": sum(spec.nbytes for spec in specs)}
    loaded_back = {**load_file(folder / shards[0]), **load_file(folder / shards[1])}
    assert loaded_back.keys() == expected.keys()
    for name, tensor in expected.items():
        assert loaded_back[name].dtype == tensor.dtype and torch.equal(loaded_back[name], tensor), name
    with safe_open(folder / shards[0], framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    assert written_in_order == ["a", "b", "c", "d"]
    report = result.verify
    total = index["metadata"]["total_size"]
    assert (report.tensors, report.shards, report.bytes, report.mismatched) == (4, 2, total, [])


def test_one_file_without_an_index_when_it_fits(tmp_path, source):
    loaded, mapped = source
    specs, produce, expected = specs_and_produce(loaded, mapped)
    result = write_sharded_safetensors(tmp_path, specs, produce, "1MB")
    assert result.filename_to_tensors == {"model.safetensors": ["a", "b", "c", "d"]} and result.verify is None
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert all(torch.equal(t, expected[name]) for name, t in load_file(tmp_path / "model.safetensors").items())


def test_verification_catches_a_corrupted_byte(tmp_path, source):
    loaded, mapped = source
    specs, produce, expected = specs_and_produce(loaded, mapped)
    path = tmp_path / "shard.safetensors"
    write_safetensors_file(path, specs, produce)
    data_start = len(safetensors_header(specs))
    flipped = data_start + 4000 + 1234  # a byte inside "b", the second tensor
    content = bytearray(path.read_bytes())
    content[flipped] ^= 0x01
    path.write_bytes(bytes(content))
    report = VerifyReport()
    verify_shard(path, specs, bitwise_check(expected), report)
    assert report.mismatched == ["b"] and report.tensors == 4 and 0 < report.max_abs_diff < 1


def test_a_failure_midway_leaves_the_folder_as_it_was(tmp_path, source):
    loaded, mapped = source
    specs, produce, _ = specs_and_produce(loaded, mapped, fail_at="c")  # in the second shard: the first is written
    (tmp_path / "notes.txt").write_text("the user's")
    with files_unchanged(tmp_path, no_new_files=True), pytest.raises(RuntimeError, match="cannot produce c"):
        write_sharded_safetensors(tmp_path, specs, produce, SHARD_BYTES)


def test_a_failed_verification_leaves_the_folder_as_it_was(tmp_path, source):
    loaded, mapped = source
    specs, produce, expected = specs_and_produce(loaded, mapped)
    (tmp_path / "notes.txt").write_text("the user's")
    verified = threading.Event()

    def refusing_check(spec, written):
        verified.set()
        raise SafetensorsWriteError(f"{spec.name} is not what was written")

    with files_unchanged(tmp_path, no_new_files=True), pytest.raises(SafetensorsWriteError, match="a is not what"):
        write_sharded_safetensors(tmp_path, specs, produce, SHARD_BYTES, check=refusing_check)
    assert verified.is_set()


def test_existing_files_named_like_the_output_are_refused_not_overwritten(tmp_path, source):
    loaded, mapped = source
    specs, produce, _ = specs_and_produce(loaded, mapped)
    (tmp_path / "model.safetensors.index.json").write_text("{}")  # the user's, or an earlier write's
    with (
        files_unchanged(tmp_path, no_new_files=True),
        pytest.raises(SafetensorsWriteError, match=r"already holds model\.safetensors\.index\.json: not overwritten"),
    ):
        write_sharded_safetensors(tmp_path, specs, produce, SHARD_BYTES)


def test_a_part_of_the_wrong_size_is_refused(tmp_path, source):
    loaded, mapped = source
    specs, produce, _ = specs_and_produce(loaded, mapped)
    with pytest.raises(AssertionError, match=r"a: produced \[\(torch.float32, \[999\]\)\]"):
        write_safetensors_file(tmp_path / "x.safetensors", specs, lambda spec: [part_tensor(produce(spec)[0])[:999]])
