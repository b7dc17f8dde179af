"""The data readers and the converter: the original MAGMA layout, convert_dataset, imagefolder, img2dataset."""

import io
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from magma_hf import (
    convert_dataset,
    from_hf_dataset,
    iter_img2dataset,
    load_image_caption_dataset,
    load_imagefolder,
    load_img2dataset,
    load_magma_dataset,
)
from magma_hf.data import detect_layout
from tests.helpers import files_unchanged, random_image, write_img2dataset, write_png


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def write_truncated_jpeg(path):
    buffer = io.BytesIO()
    random_image(99, size=(64, 64)).save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[:300])


def assert_pairs_match(dataset):
    """Every row's caption names the seed its image was drawn from: a wrong pair would show here."""
    for row in dataset:
        if row["image"] is None:
            continue
        seed = int(row["captions"][0].split()[-1])
        assert np.array_equal(pixels(row["image"]), pixels(random_image(seed, size=(20, 16)))), row["image_path"]


@pytest.fixture
def original_layout(tmp_path):
    root = tmp_path / "magma_ds"
    data = root / "image_data" / "0"
    data.mkdir(parents=True)
    write_png(root / "images" / "0" / "a.png", 1)
    (data / "0.json").write_text(
        json.dumps({"image_path": "images/0/a.png", "captions": ["image 1", "also image 1"], "metadata": {"k": 1}})
    )
    write_png(root / "images" / "0" / "1.png", 2)  # no image_path: found by the json's stem under images/0/
    (data / "1.json").write_text(json.dumps({"captions": ["image 2"], "metadata": {"source": "stem"}}))
    write_png(data / "2.png", 3)  # no image_path and nothing under images/: the image beside the json
    (data / "2.json").write_text(json.dumps({"captions": ["image 3"]}))
    (data / "3.json").write_text(json.dumps({"image_path": "images/0/gone.png", "captions": ["image 4"]}))
    write_png(root / "images" / "0" / "e.png", 5)
    (data / "4.json").write_text(json.dumps({"image_path": "images/0/e.png", "captions": ["", "  "]}))
    (data / "5.json").write_text("{not json")
    (root / "images" / "0" / "corrupt.jpg").write_bytes(b"definitely not an image")
    (data / "6.json").write_text(json.dumps({"image_path": "images/0/corrupt.jpg", "captions": ["image 7"]}))
    write_truncated_jpeg(root / "images" / "0" / "truncated.jpg")
    (data / "7.json").write_text(json.dumps({"image_path": "images/0/truncated.jpg", "captions": ["image 8"]}))
    sub = root / "image_data" / "1"
    sub.mkdir()
    write_png(root / "images" / "1" / "x.png", 9)
    (sub / "8.json").write_text(json.dumps({"image_path": "images/1/x.png", "captions": "image 9"}))
    return root


def test_original_layout_reads_pairs_and_skips_bad_samples(original_layout, caplog):
    with caplog.at_level(logging.WARNING, logger="magma_hf.data"):
        ds = load_magma_dataset(str(original_layout))
    # 9 jsons: missing image, empty captions and bad json are dropped when reading; the two undecodable images are
    # only found out when decoded, and come back as None.
    assert len(ds) == 6
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipping")]
    assert len(skipped) == 3
    assert any("gone.png does not exist" in m for m in skipped)
    assert any("4.json: no captions" in m for m in skipped)
    assert any("5.json: unreadable json" in m for m in skipped)
    assert any("kept 6 samples, skipped 3" in r.getMessage() for r in caplog.records)

    rows = {row["captions"][0]: row for row in ds}
    assert rows["image 1"]["captions"] == ["image 1", "also image 1"]
    assert json.loads(rows["image 1"]["metadata"]) == {"k": 1}
    assert json.loads(rows["image 3"]["metadata"]) == {}
    assert rows["image 2"]["image_path"] == str(original_layout / "images" / "0" / "1.png")
    assert rows["image 3"]["image_path"] == str(original_layout / "image_data" / "0" / "2.png")
    assert rows["image 9"]["captions"] == ["image 9"]  # a single string is one caption
    assert isinstance(rows["image 1"]["image"], Image.Image)
    assert_pairs_match(ds)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="magma_hf.data"):
        assert rows["image 7"]["image"] is None and rows["image 8"]["image"] is None
        assert ds[4]["image"] is None  # read again: no second warning
    # rows were decoded (and warned about) when `rows` was built; nothing new is warned here
    assert not [r for r in caplog.records if "cannot decode" in r.getMessage()]


def test_undecodable_image_warns_once(original_layout, caplog):
    ds = load_magma_dataset(original_layout)
    index = ds.with_format(None)["image_path"].index(str(original_layout / "images" / "0" / "truncated.jpg"))
    from magma_hf.data import decoding as data

    data._WARNED_IMAGES.clear()
    with caplog.at_level(logging.WARNING, logger="magma_hf.data"):
        assert ds[index]["image"] is None
        assert ds[index]["image"] is None
    warnings = [r.getMessage() for r in caplog.records if "cannot decode" in r.getMessage()]
    assert len(warnings) == 1 and "truncated.jpg" in warnings[0]


def test_list_of_dirs_concatenates_and_split_keeps_decoding(original_layout, tmp_path):
    ds = load_magma_dataset([original_layout, original_layout])
    assert len(ds) == 12
    split = ds.train_test_split(test_size=0.25, seed=0)
    assert len(split["test"]) == 3
    assert all(isinstance(row["image"], (Image.Image, type(None))) for row in split["train"])
    assert_pairs_match(split["train"])


def test_missing_layout_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no image_data/ folder"):
        load_magma_dataset(tmp_path)


def make_sources(tmp_path):
    """7 distinct images, 10 samples: two images named by 2 samples each, one sample without captions, one missing."""
    src = tmp_path / "src"
    samples = []
    for seed in range(7):
        folder = src / ("a" if seed < 4 else "b")
        write_png(folder / f"img{seed % 4}.png", seed)  # a/img0.png and b/img0.png: same name, different images
        samples.append((folder / f"img{seed % 4}.png", {"captions": [f"image {seed}"], "metadata": {"seed": seed}}))
    samples.insert(3, (samples[1][0], {"captions": ["image 1"], "metadata": {"seed": 1, "dup": True}}))
    samples.insert(6, (src / "missing.png", {"captions": ["image 100"], "metadata": {}}))
    samples.append((samples[0][0], {"captions": [], "metadata": {}}))
    samples.append((samples[5][0], {"captions": ["image 4"], "metadata": {"seed": 4, "dup": True}}))
    return src, samples


@pytest.mark.parametrize("mode", ["cp", "mv"])
def test_convert_dataset_round_trip(tmp_path, mode):
    src, samples = make_sources(tmp_path)
    out = tmp_path / "out"
    summary = convert_dataset(
        out, samples, dir_size=3, hash_fn=lambda image: image.size[0] * 1000 + image.getpixel((0, 0))[0], mode=mode
    )
    assert (summary.samples, summary.images, summary.skipped) == (9, 7, 2)

    # jsons: sample k is image_data/{k // 3}/{k}.json
    jsons = sorted(p.relative_to(out).as_posix() for p in (out / "image_data").rglob("*.json"))
    assert jsons == sorted(f"image_data/{k // 3}/{k}.json" for k in range(9))
    records = [json.loads((out / "image_data" / str(k // 3) / f"{k}.json").read_text()) for k in range(9)]
    # images: at most 3 distinct per folder, in order of first appearance, each written once
    image_files = sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png"))
    assert len(image_files) == 7
    assert all(len(list((out / "images" / str(n)).iterdir())) <= 3 for n in range(3))
    assert records[0]["image_path"] == "images/0/img0.png"
    assert records[3]["image_path"] == records[1]["image_path"]  # the duplicate points to the same file
    assert records[3]["metadata"]["image_hash"] == records[1]["metadata"]["image_hash"]
    assert records[3]["metadata"]["dup"] is True
    assert records[4]["image_path"].startswith("images/1/")
    assert len(set(r["image_path"] for r in records)) == 7
    for record in records:
        seed = record["metadata"]["seed"]
        image = Image.open(out / record["image_path"])
        assert np.array_equal(pixels(image), pixels(random_image(seed, size=(20, 16))))
        assert record["metadata"]["image_hash"] == str(image.size[0] * 1000 + image.convert("RGB").getpixel((0, 0))[0])
    assert (src / "a" / "img0.png").exists() == (mode == "cp")

    ds = load_magma_dataset(out)
    assert len(ds) == 9
    assert_pairs_match(ds)
    with files_unchanged(tmp_path, no_new_files=True), pytest.raises(FileExistsError, match="images is not empty"):
        convert_dataset(out, samples, dir_size=3, mode="cp")  # the same command twice


def test_convert_dataset_matches_original_numbering_for_full_chunks(tmp_path):
    """With fewer than dir_size samples everything is in folder 0, named 0..n-1, as the original wrote it."""
    src = tmp_path / "src"
    samples = []
    for seed in range(4):
        write_png(src / f"{seed}.png", seed)
        samples.append((str(src / f"{seed}.png"), {"captions": [f"image {seed}"]}))
    convert_dataset(tmp_path / "out", iter(samples), mode="cp")  # an unsized iterator works too
    assert sorted(p.name for p in (tmp_path / "out" / "image_data" / "0").iterdir()) == [f"{k}.json" for k in range(4)]
    assert sorted(p.name for p in (tmp_path / "out" / "images" / "0").iterdir()) == [f"{k}.png" for k in range(4)]
    assert json.loads((tmp_path / "out" / "image_data" / "0" / "2.json").read_text()) == {
        "captions": ["image 2"],
        "image_path": "images/0/2.png",
    }


def test_convert_dataset_keeps_same_named_images_apart(tmp_path):
    write_png(tmp_path / "x" / "p.png", 1)
    write_png(tmp_path / "y" / "p.png", 2)
    samples = [
        (tmp_path / "x" / "p.png", {"captions": ["image 1"]}),
        (tmp_path / "y" / "p.png", {"captions": ["image 2"]}),
    ]
    convert_dataset(tmp_path / "out", samples, mode="cp")
    assert sorted(p.name for p in (tmp_path / "out" / "images" / "0").iterdir()) == ["p-1.png", "p.png"]
    assert_pairs_match(load_magma_dataset(tmp_path / "out"))


def test_imagefolder(tmp_path, caplog):
    folder = tmp_path / "imagefolder"
    entries = []
    for seed in range(4):
        write_png(folder / f"{seed}.png", seed)
        entries.append({"file_name": f"{seed}.png", "text": f"image {seed}", "source": "test"})
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    entries.append({"file_name": "bad.png", "text": "image 50", "source": "test"})
    write_png(folder / "nocap.png", 60)
    entries.append({"file_name": "nocap.png", "text": "", "source": "test"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(e) for e in entries))
    assert detect_layout(folder) == "imagefolder"

    with caplog.at_level(logging.WARNING, logger="magma_hf.data"):
        ds = load_imagefolder(folder)
    assert len(ds) == 5
    assert any("no captions" in r.getMessage() for r in caplog.records)
    assert set(ds.column_names) == {"image", "image_path", "captions", "metadata"}
    by_caption = {row["captions"][0]: row for row in ds}
    assert by_caption["image 50"]["image"] is None
    assert json.loads(by_caption["image 2"]["metadata"]) == {"source": "test"}
    assert by_caption["image 2"]["image_path"].endswith("2.png")
    assert_pairs_match(ds)


def test_hf_dataset_with_list_captions_and_bytes():
    from datasets import Dataset, Features, List, Value
    from datasets import Image as ImageFeature

    images = []
    for seed in range(3):
        buffer = io.BytesIO()
        random_image(seed, size=(20, 16)).save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
    ds = Dataset.from_dict(
        {"img": images, "caps": [["image 0", "x"], ["image 1"], []]},
        features=Features({"img": ImageFeature(), "caps": List(Value("string"))}),
    )
    with pytest.raises(ValueError, match="caption_column='nope' is not a column"):
        from_hf_dataset(ds, image_column="img", caption_column="nope")
    out = from_hf_dataset(ds, image_column="img", caption_column="caps")
    assert len(out) == 2 and out[0]["captions"] == ["image 0", "x"] and out[0]["image_path"] == ""
    assert_pairs_match(out)


def test_img2dataset_files(tmp_path, caplog):
    root = tmp_path / "i2d"
    write_img2dataset(root)
    assert detect_layout(root) == "img2dataset"
    with caplog.at_level(logging.WARNING, logger="magma_hf.data"):
        ds = load_image_caption_dataset(str(root))
    assert len(ds) == 5
    assert any("000000004.png: no captions" in r.getMessage() for r in caplog.records)
    rows = {row["captions"][0]: row for row in ds}
    assert json.loads(rows["image 0"]["metadata"])["url"] == "http://x/0"
    assert rows["image 5"]["image"] is None
    assert_pairs_match(ds)
    # the same samples feed convert_dataset
    summary = convert_dataset(tmp_path / "converted", iter_img2dataset(root), mode="cp")
    assert summary.samples == 5
    assert_pairs_match(load_magma_dataset(tmp_path / "converted"))


def test_img2dataset_webdataset_tars(tmp_path):
    root = tmp_path / "wds"
    root.mkdir()
    with tarfile.open(root / "00000.tar", "w") as tar:
        for seed in range(3):
            buffer = io.BytesIO()
            random_image(seed, size=(20, 16)).save(buffer, format="PNG")
            for suffix, payload in ((".png", buffer.getvalue()), (".txt", f"image {seed}".encode())):
                info = tarfile.TarInfo(f"00000000{seed}{suffix}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    ds = load_img2dataset(root)
    assert len(ds) == 3
    assert_pairs_match(ds)


# ---------------------------------------------------------------------------------------------------------------------
# convert_dataset: nothing the user has is lost


def seeded_sources(tmp_path, names):
    """One PNG per (folder, name), drawn from seed = its position; its caption names the seed."""
    samples = []
    for seed, name in enumerate(names):
        write_png(tmp_path / "src" / name, seed)
        samples.append((tmp_path / "src" / name, {"captions": [f"image {seed}"], "metadata": {"seed": seed}}))
    return samples


def assert_converted(out, samples):
    """Every sample is in the dataset with its own image, and under mv no source is left behind."""
    dataset = load_magma_dataset(out)
    assert len(dataset) == len(samples)
    assert_pairs_match(dataset)
    assert len({Path(path).name for path in dataset.with_format(None)["image_path"]}) == len(samples)


def test_convert_dataset_never_reuses_a_name_already_written(tmp_path):
    """The second `p.png` (sample 5) is renamed `p-5.png`: a name the first sample's image already has."""
    names = ["a/p-5.png", "c/p.png", "d/q.png", "e/r.png", "f/s.png", "b/p.png", "g/P.png"]
    samples = seeded_sources(tmp_path, names)
    summary = convert_dataset(tmp_path / "out", samples, mode="mv")
    assert_converted(tmp_path / "out", samples)
    assert summary.images == 7 and not list((tmp_path / "src").rglob("*.png"))
    written = sorted(p.name for p in (tmp_path / "out" / "images" / "0").iterdir())
    # P.png too gets its own name: on a case-blind disk (macOS, Windows) it is the same file as p.png
    assert written == sorted(["p-5.png", "p.png", "q.png", "r.png", "s.png", "p-5-2.png", "P-6.png"])


def test_convert_dataset_into_the_folder_holding_the_images(tmp_path):
    """The user's photos in `out/raw/`, converted into `out` itself: moved into the dataset, the rest kept."""
    samples = [
        (tmp_path / "out" / "raw" / path.name, data) for path, data in seeded_sources(tmp_path, ["a.png", "b.png"])
    ]
    for path, _ in samples:
        path.parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / path.name).rename(path)
    (tmp_path / "out" / "README.md").write_text("the user's notes")
    convert_dataset(tmp_path / "out", samples, mode="mv")
    assert_converted(tmp_path / "out", samples)
    assert (tmp_path / "out" / "README.md").read_text() == "the user's notes"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "image_data", "images", "raw"]


def failing_iterator(samples, at):
    for index, sample in enumerate(samples):
        if index == at:
            raise RuntimeError("the user's iterator broke")
        yield sample


def bytes_caption(samples, at):
    samples = list(samples)
    samples[at] = (samples[at][0], {"captions": [b"caf\xc3\xa9 au lait"]})
    return samples


def surrogate_caption(samples, at):
    samples = list(samples)
    samples[at] = (samples[at][0], {"captions": [b"caf\xe9".decode("utf-8", "surrogateescape")]})
    return samples


def failing_hash(image):
    if image.getpixel((0, 0)) == random_image(3, size=(20, 16)).getpixel((0, 0)):
        raise ValueError("cannot hash this one")
    return 0


def unserializable_metadata(samples, at):
    samples = list(samples)
    samples[at] = (samples[at][0], {"captions": ["image 3"], "metadata": {"raw": b"\x00"}})
    return samples


@pytest.mark.parametrize(
    ("make", "hash_fn", "error", "message"),
    [
        (lambda s: failing_iterator(s, 3), None, RuntimeError, "the user's iterator broke"),
        (lambda s: bytes_caption(s, 3), None, ValueError, r"sample 3 \(.*d\.png\): caption 0 is bytes"),
        (lambda s: surrogate_caption(s, 3), None, ValueError, r"sample 3 \(.*d\.png\): caption 0 is not valid UTF-8"),
        (lambda s: s, failing_hash, ValueError, r"sample 3 \(.*d\.png\): hash_fn failed: ValueError: cannot hash"),
        (lambda s: unserializable_metadata(s, 3), None, ValueError, r"sample 3 .*cannot be written as JSON"),
    ],
    ids=["iterator-raises", "bytes-caption", "invalid-utf8-caption", "hash-fails", "metadata-not-json"],
)
def test_convert_dataset_failing_midway_leaves_everything_as_it_was(tmp_path, make, hash_fn, error, message):
    samples = seeded_sources(tmp_path, ["a.png", "b.png", "c.png", "d.png", "e.png"])
    with files_unchanged(tmp_path, no_new_files=True), pytest.raises(error, match=message) as raised:
        convert_dataset(tmp_path / "out", make(samples), mode="mv", hash_fn=hash_fn)
    assert not (tmp_path / "out").exists()
    assert "is as it was" in "".join(getattr(raised.value, "__notes__", []))
    convert_dataset(tmp_path / "out", samples, mode="mv")  # the rerun, once the cause is fixed, just works
    assert_converted(tmp_path / "out", samples)


@pytest.mark.parametrize("mode", ["mv", "cp"])
def test_convert_dataset_failing_while_moving_puts_the_images_back(tmp_path, monkeypatch, mode):
    from magma_hf.data import convert as data

    samples = seeded_sources(tmp_path, ["a.png", "b.png", "c.png", "d.png"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("the user's own file")
    real_transfer, calls = data._transfer_image, []

    def transfer_then_fail(source, target, mode):
        calls.append(source)
        if len(calls) == 3:
            raise OSError(f"I/O error writing {target}")
        real_transfer(source, target, mode)

    monkeypatch.setattr(data, "_transfer_image", transfer_then_fail)
    with files_unchanged(tmp_path, no_new_files=True), pytest.raises(OSError, match="I/O error") as raised:
        convert_dataset(tmp_path / "out", samples, mode=mode)
    assert "the 2 images it had transferred" in "".join(raised.value.__notes__)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt"]


def run_killed(convert, timeout: float = 60.0) -> int:
    """Run `convert()` in a forked child that SIGKILLs itself where the test says; returns the signal it died of."""
    import os
    import signal
    import time

    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            convert()
        finally:
            os._exit(1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the conversion did not reach the point where it is killed")


@pytest.mark.parametrize(("stage", "mode"), [("planning", "mv"), ("moving", "mv"), ("moving", "cp")])
def test_convert_dataset_killed_is_finished_by_the_rerun(tmp_path, stage, mode, caplog, monkeypatch):
    import os
    import signal

    from magma_hf.data import convert as data

    samples = seeded_sources(tmp_path, ["a.png", "b.png", "c.png", "d.png", "e.png"])
    out = tmp_path / "out"
    real_transfer, calls = data._transfer_image, []

    def transfer_then_die(source, target, mode):
        calls.append(source)
        if stage == "moving" and len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        real_transfer(source, target, mode)

    def samples_then_die():
        for index, sample in enumerate(samples):
            if stage == "planning" and index == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            yield sample

    with monkeypatch.context() as patch:
        patch.setattr(data, "_transfer_image", transfer_then_die)
        assert run_killed(lambda: convert_dataset(out, samples_then_die(), dir_size=2, mode=mode)) == signal.SIGKILL
    with pytest.raises(FileNotFoundError, match="a convert_dataset into it was interrupted"):
        load_magma_dataset(out)  # no reader takes the half-written dataset for a whole one
    if stage == "planning":  # no image touched yet
        assert len(list((tmp_path / "src").glob("*.png"))) == 5
    else:  # two transferred, three still at their sources, none lost
        on_disk = list((tmp_path / "src").glob("*.png")) + list((out / ".convert_dataset-partial").rglob("*.png"))
        assert len(on_disk) == (5 if mode == "mv" else 7)
    with caplog.at_level(logging.WARNING, logger="magma_hf.data"):
        summary = convert_dataset(out, samples, dir_size=2, mode=mode)
    expected = "starting again" if stage == "planning" else "interrupted while transferring its 5 images: finishing"
    assert any(expected in record.getMessage() for record in caplog.records)
    assert (summary.samples, summary.images) == (5, 5)
    assert sorted(p.name for p in out.iterdir()) == ["image_data", "images"]
    assert_converted(out, samples)
    assert len(list((tmp_path / "src").glob("*.png"))) == (0 if mode == "mv" else 5)


def test_convert_dataset_resume_with_other_options_is_refused(tmp_path):
    from magma_hf.data.convert import STAGING_FOLDER, TRANSFERS_FILE

    staging = tmp_path / "out" / STAGING_FOLDER
    staging.mkdir(parents=True)
    header = {"mode": "mv", "dir_size": 2, "summary": {"samples": 0, "images": 0, "skipped": 0}}
    (staging / TRANSFERS_FILE).write_text(json.dumps(header) + "\n")
    with files_unchanged(tmp_path), pytest.raises(ValueError, match="started with mode='mv', dir_size=2; rerun"):
        convert_dataset(tmp_path / "out", [], dir_size=10, mode="mv")


# ---------------------------------------------------------------------------------------------------------------------
# Captions that are not text, in every reader


def test_readers_name_captions_that_are_not_text(tmp_path, caplog):
    from datasets import Dataset

    root = tmp_path / "i2d" / "00000"
    write_png(root / "000.png", 0)
    (root / "000.txt").write_bytes(b"caf\xe9 au lait")  # Latin-1, not UTF-8
    write_png(root / "001.png", 1)
    (root / "001.txt").write_text("image 1")
    with caplog.at_level(logging.WARNING, logger="magma_hf.data"):
        ds = load_img2dataset(tmp_path / "i2d")
        with pytest.raises(ValueError, match="none of the 2 rows is usable"):
            from_hf_dataset(
                Dataset.from_dict({"image": [{"path": str(root / "001.png"), "bytes": None}] * 2, "text": [b"x", b"y"]})
            )
    assert ds.with_format(None)["captions"] == [["image 1"]]  # not "caf\ufffd au lait"
    messages = [record.getMessage() for record in caplog.records]
    assert any("000.txt is not valid UTF-8 (line 1, byte 3: b'\\xe9')" in message for message in messages)
    assert any("caption 0 is bytes (b'x')" in message for message in messages)
    assert any("kept 0 samples, skipped 2 (2 bad captions)" in message for message in messages)


def test_webdataset_shard_with_a_caption_that_is_not_utf8_is_named(tmp_path):
    root = tmp_path / "wds"
    root.mkdir()
    with tarfile.open(root / "00000.tar", "w") as tar:
        for name, payload in (("000000000.png", b"x"), ("000000000.txt", b"fine"), ("000000001.txt", b"bad \xff")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    message = r"000000001.txt in .*00000.tar is not valid UTF-8 \(line 1, byte 4: b'\\xff'\)"
    with files_unchanged(root), pytest.raises(ValueError, match=message):
        load_img2dataset(root)


def test_imagefolder_metadata_that_is_not_utf8_is_named(tmp_path):
    folder = tmp_path / "photos"
    write_png(folder / "a.png", 0)
    write_png(folder / "b.png", 1)
    (folder / "metadata.jsonl").write_bytes(
        b'{"file_name": "a.png", "text": "ok"}\n{"file_name": "b.png", "text": "caf\xe9"}\n'
    )
    message = r"metadata.jsonl is not valid UTF-8 \(line 2, byte 72: b'\\xe9'\)"
    with files_unchanged(folder), pytest.raises(ValueError, match=message):
        load_imagefolder(folder)


def test_convert_dataset_killed_mid_copy_drops_only_its_own_temporary(tmp_path, monkeypatch):
    """A copy cut by SIGKILL is removed by the rerun; a user's image named like a temporary (`b.png.partial`) stays."""
    import os
    import shutil
    import signal

    from magma_hf.data import convert as data

    samples = seeded_sources(tmp_path, ["a.png", "b.png.partial", "b.png"])
    out = tmp_path / "out"
    real_copy, calls = shutil.copy2, []

    def copy_half_then_die(source, target):
        calls.append(source)
        if len(calls) == 3:
            Path(target).write_bytes(Path(source).read_bytes()[:10])
            os.kill(os.getpid(), signal.SIGKILL)
        return real_copy(source, target)

    with monkeypatch.context() as patch:
        patch.setattr(data.shutil, "copy2", copy_half_then_die)
        assert run_killed(lambda: convert_dataset(out, samples, mode="cp")) == signal.SIGKILL
    assert len(list((out / ".convert_dataset-partial").rglob("*.tmp"))) == 1
    convert_dataset(out, samples, mode="cp")
    assert_converted(out, samples)
    assert not list(out.rglob("*.tmp"))
    assert sorted(p.name for p in (out / "images" / "0").iterdir()) == ["a.png", "b.png", "b.png.partial"]


# ---------------------------------------------------------------------------------------------------------------------
# Stray files and file names that are not UTF-8 (issue 18 B)


def write_photos(root, count=4):
    for seed in range(count):
        write_png(root / ("trip" if seed % 2 else "") / f"photo{seed}.png", seed)
    return root


@pytest.mark.parametrize(
    "strays",
    [
        ["notes.txt"],  # today read as img2dataset output: every photo "has no caption", all are dropped
        ["trip/README.txt"],
        ["photo1.txt"],  # notes about one photo: today only that photo is kept
        ["backup.tar"],  # today read as webdataset shards: the photos are not read at all
    ],
)
def test_a_folder_of_photos_with_a_stray_file_is_not_a_dataset(tmp_path, strays):
    root = write_photos(tmp_path / "photos")
    for name in strays:
        (root / name).write_text("my own notes")
    with files_unchanged(root), pytest.raises(ValueError, match=r"Cannot tell the layout .*4 image files"):
        detect_layout(root)


def test_img2dataset_files_output_is_told_from_its_pairs_and_stated(tmp_path, caplog):
    root = tmp_path / "i2d"
    write_img2dataset(root)  # 6 images, each beside a same-stem .txt or .json
    (root / "README.txt").write_text("downloaded with img2dataset")
    (root / "00000" / "000000099.png").write_bytes(b"")  # an image without its pair does not change the decision
    with caplog.at_level(logging.INFO, logger="magma_hf.data"):
        assert detect_layout(root) == "img2dataset"
        ds = load_image_caption_dataset(str(root))
    messages = [record.getMessage() for record in caplog.records]
    assert any("read as img2dataset `files` output: 6 of the 7 images" in message for message in messages)
    assert any("read as img2dataset `files` output: 5 images with captions" in message for message in messages)
    assert len(ds) == 5


def test_file_names_that_are_not_utf8_are_named_and_skipped(tmp_path, caplog):
    """Linux allows any bytes in a name; Arrow (and JSON output) hold UTF-8 only: today a codec error naming no file."""
    i2d = tmp_path / "i2d" / "00000"
    for name in (b"000", b"caf\xe9"):  # the second a Latin-1 name
        write_png(Path(os.fsdecode(bytes(i2d) + b"/" + name + b".png")), len(name))
        Path(os.fsdecode(bytes(i2d) + b"/" + name + b".txt")).write_text(f"image {len(name)}")
    magma = tmp_path / "magma"
    write_png(magma / "images" / "0" / "0.png", 3)
    (magma / "image_data" / "0").mkdir(parents=True)
    (magma / "image_data" / "0" / "0.json").write_text(json.dumps({"captions": ["image 3"]}))
    write_png(Path(os.fsdecode(bytes(magma) + b"/images/0/\xff.png")), 5)
    Path(os.fsdecode(bytes(magma) + b"/image_data/0/\xff.json")).write_text(json.dumps({"captions": ["image 5"]}))
    with caplog.at_level(logging.WARNING, logger="magma_hf.data"):
        assert load_image_caption_dataset(str(tmp_path / "i2d")).with_format(None)["captions"] == [["image 3"]]
        assert load_image_caption_dataset(str(magma)).with_format(None)["captions"] == [["image 3"]]
    messages = [record.getMessage() for record in caplog.records]
    assert any("00000/caf\\xe9.png: bad file name: not valid UTF-8" in message for message in messages)
    named = "\\xff.json: bad file name: its image /"
    assert any(named in m and "images/0/\\xff.png is not valid UTF-8" in m for m in messages)
    assert all(message.encode("utf-8") for message in messages)  # printable: no lone surrogates


def test_convert_dataset_gives_a_name_that_is_not_utf8_a_utf8_one(tmp_path):
    """The converted dataset's names are the converter's to choose: today its json held the raw name, which no
    reader could load (a codec error naming no file)."""
    source = Path(os.fsdecode(bytes(tmp_path / "src") + b"/caf\xe9.png"))
    write_png(source, 5)
    convert_dataset(tmp_path / "out", [(source, {"captions": ["image 5"]})], mode="cp")
    assert [p.name for p in (tmp_path / "out" / "images" / "0").iterdir()] == ["caf%E9.png"]
    dataset = load_magma_dataset(tmp_path / "out")
    assert len(dataset) == 1
    assert_pairs_match(dataset)
