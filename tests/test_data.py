"""The data readers and the converter: the original MAGMA layout, convert_dataset, imagefolder, img2dataset."""

import io
import json
import logging
import tarfile

import numpy as np
import pytest
from PIL import Image

from magma_hf.data import (
    convert_dataset,
    detect_layout,
    from_hf_dataset,
    iter_img2dataset,
    load_image_caption_dataset,
    load_imagefolder,
    load_img2dataset,
    load_magma_dataset,
)
from tests.helpers import random_image


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def write_png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    random_image(seed, size=(20, 16)).save(path)  # PNG: lossless, so pixels identify the image exactly


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
    from magma_hf import data

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
    with pytest.raises(FileExistsError, match="not empty"):
        convert_dataset(out, samples, dir_size=3, mode="cp")


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


def write_img2dataset(root):
    shard = root / "00000"
    shard.mkdir(parents=True)
    for seed in range(3):
        write_png(shard / f"00000000{seed}.png", seed)
        (shard / f"00000000{seed}.json").write_text(json.dumps({"key": f"00000000{seed}", "url": f"http://x/{seed}"}))
        (shard / f"00000000{seed}.txt").write_text(f"image {seed}\n")
    write_png(shard / "000000003.png", 3)  # caption only in the json
    (shard / "000000003.json").write_text(json.dumps({"caption": "image 3", "key": "000000003"}))
    write_png(shard / "000000004.png", 4)  # no caption at all
    (shard / "000000004.json").write_text(json.dumps({"key": "000000004"}))
    (root / "00000_stats.json").write_text(json.dumps({"count": 5}))
    (shard / "000000005.png").write_bytes(b"corrupt")
    (shard / "000000005.txt").write_text("image 5")


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
