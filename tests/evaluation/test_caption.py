"""`magma-hf caption` in one process: the image sources, the texts, resuming and refusing, bad input.
(Two processes under `accelerate launch`: tests/evaluation/test_sharded.py.)"""

import importlib.util
import io
import json
import logging
import os
import re
import shutil

import datasets
import PIL.Image
import pytest
import torch

from magma_hf import MagmaForConditionalGeneration
from magma_hf.captioning import caption_images
from magma_hf.cli import main
from magma_hf.generation import generate_answers
from tests.doc_blocks import run_by
from tests.helpers import (
    encoded_image,
    files_unchanged,
    img2dataset_samples,
    random_image,
    write_tar,
)

PROMPT = "Q: What is in the picture? A:"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    (root / "b").mkdir()
    for n in range(5):
        random_image(n, size=(70 + 10 * n, 60)).save(root / ("b" if n == 2 else "") / f"{n}.png")
    (root / "notes.md").write_text("not an image")
    return root


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_folder_a_magma_dataset_and_a_saved_dataset_give_generate_answers_texts(
    model_and_processor, image_dir, tmp_path
):
    model, processor = model_and_processor
    ids = ["0.png", "1.png", "3.png", "4.png", "b/2.png"]
    images = [random_image(n, size=(70 + 10 * n, 60)) for n in (0, 1, 3, 4, 2)]
    expected = generate_answers(model, processor, [f"<|image|>{PROMPT}"] * 5, [[i] for i in images], max_new_tokens=6)
    assert len(set(expected)) > 1  # the images give different texts, so that an order mix-up shows

    output = tmp_path / "folder.jsonl"
    records = caption_images(model, image_dir, output, processor=processor, prompt=PROMPT, batch_size=2,
                             max_new_tokens=6, progress=False)  # fmt: skip
    header, *lines = _lines(output)
    assert header["format"] == "magma_hf.caption/1" and header["settings"]["prompt"] == f"<|image|>{PROMPT}"
    assert lines == records
    assert [r["id"] for r in records] == ids
    assert [r["image"] for r in records] == [str(image_dir / i) for i in ids]
    assert [r["text"] for r in records] == expected
    assert {r["prompt"] for r in records} == {f"<|image|>{PROMPT}"}

    # The same images in the original MAGMA layout (its captions are not used): ids are row numbers.
    magma = tmp_path / "magma"
    (magma / "image_data").mkdir(parents=True)
    shutil.copytree(image_dir / "b", magma / "images")
    for n in (0, 1, 3, 4):
        shutil.copy(image_dir / f"{n}.png", magma / "images")
    for row, name in enumerate(["2", "0", "4"]):
        sample = {"image_path": f"images/{name}.png", "captions": ["a caption"]}
        (magma / "image_data" / f"{row}.json").write_text(json.dumps(sample))
    records = caption_images(model, magma, tmp_path / "magma.jsonl", processor=processor, prompt=PROMPT,
                             max_new_tokens=6, progress=False)  # fmt: skip
    assert [r["id"] for r in records] == ["0", "1", "2"]
    assert [r["image"] for r in records] == [str((magma / "images" / f"{n}.png").resolve()) for n in (2, 0, 4)]
    assert [r["text"] for r in records] == [expected[4], expected[0], expected[3]]

    # A save_to_disk dataset with its images in another column; `image` names the row.
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict(
        {"img": [str(image_dir / i) for i in ids], "other": list(range(5))}, features=datasets.Features(
            {"img": datasets.Image(), "other": datasets.Value("int64")})
    ).save_to_disk(str(saved))  # fmt: skip
    with pytest.raises(ValueError, match=r"no image column 'image' \(columns: \['img', 'other'\]\)"):
        caption_images(model, saved, tmp_path / "x.jsonl", processor=processor, progress=False)
    records = caption_images(model, saved, tmp_path / "saved.jsonl", processor=processor, prompt=PROMPT,
                             image_column="img", batch_size=3, max_new_tokens=6, progress=False)  # fmt: skip
    assert [r["id"] for r in records] == ["0", "1", "2", "3", "4"]
    assert records[1]["image"] == f"{saved.resolve()}[1]"
    assert [r["text"] for r in records] == expected


def test_rerun_resumes_or_is_refused_naming_the_difference(model_dir, model_and_processor, image_dir, tmp_path):
    model, processor = model_and_processor
    image_dir = shutil.copytree(image_dir, tmp_path / "photos")
    output = image_dir / "captions.jsonl"  # the output beside the images: not read as one, never touching them
    arguments = ["caption", "--data", str(image_dir), "--model", str(model_dir), "--output", str(output),
                 "--batch-size", "2", "--max-new-tokens", "4", "--no-progress"]  # fmt: skip
    with files_unchanged(image_dir):
        assert main(arguments) == 0
    complete = output.read_bytes()
    assert len(complete.splitlines()) == 1 + 5
    lines = complete.split(b"\n")
    output.write_bytes(b"\n".join(lines[:3]) + b"\n" + lines[3][:15])  # killed after 2 images, mid-line
    assert main(arguments) == 0
    assert output.read_bytes() == complete
    with files_unchanged(tmp_path):  # finished: a rerun changes nothing
        assert main(arguments) == 0

    for changed, named in (
        ({"prompt": "A picture of"}, "prompt: '<|image|>' in the file, '<|image|>A picture of' now"),
        ({"max_new_tokens": 5}, "max_new_tokens: 4 in the file, 5 now"),
    ):
        with files_unchanged(tmp_path), pytest.raises(ValueError, match="Cannot resume .*" + re.escape(named)):
            caption_images(str(model_dir), image_dir, output, **{"max_new_tokens": 4, **changed}, progress=False)
    torch.manual_seed(1)
    other = MagmaForConditionalGeneration(model.config).eval()
    with files_unchanged(tmp_path), pytest.raises(ValueError, match="model_weights: 'sha256:"):
        caption_images(other, image_dir, output, processor=processor, max_new_tokens=4, progress=False)


def test_bad_input_is_named(model_dir, model_and_processor, image_dir, tmp_path, capsys):
    model, processor = model_and_processor
    broken = tmp_path / "broken"
    shutil.copytree(image_dir, broken)
    (broken / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    output = tmp_path / "broken.jsonl"
    with pytest.raises(ValueError, match=r"Cannot read the image .*broken/1\.png \(id '1\.png'\): UnidentifiedImage"):
        caption_images(model, broken, output, processor=processor, batch_size=1, max_new_tokens=2, progress=False)
    assert [r["id"] for r in _lines(output)[1:]] == ["0.png"]  # the images before it are kept

    empty = tmp_path / "empty"
    empty.mkdir()
    with files_unchanged(tmp_path), pytest.raises(ValueError, match="empty holds no images"):
        caption_images(model, empty, tmp_path / "e.jsonl", processor=processor, progress=False)
    for content in (b"my own notes\n", b'{"format": "magma_hf.evaluation/2", "settings": {}}\n'):
        (tmp_path / "mine.jsonl").write_bytes(content)
        with files_unchanged(tmp_path), pytest.raises(ValueError, match="mine.jsonl is not a magma_hf caption log"):
            caption_images(model, image_dir, tmp_path / "mine.jsonl", processor=processor, progress=False)

    with files_unchanged(tmp_path):
        assert main(["caption", "--data", str(tmp_path / "nowhere"), "--model", str(model_dir)]) == 2
        assert "nowhere: there is no such folder" in capsys.readouterr().err
        if importlib.util.find_spec("vllm") is None:
            arguments = ["caption", "--data", str(image_dir), "--model", str(model_dir), "--engine", "vllm",
                         "--output", str(tmp_path / "v.jsonl")]  # fmt: skip
            assert main(arguments) == 2
            assert "needs vLLM, which is not installed in this environment. `make vllm`" in capsys.readouterr().err


@pytest.mark.parametrize("output_format", ["webdataset", "parquet"])
def test_img2dataset_shards_are_captioned_where_they_lie(
    model_dir, model_and_processor, img2dataset_output, tmp_path, monkeypatch, output_format
):
    """img2dataset's own output: every sample it downloaded, none it failed, ids `<shard>/<key>`, labels naming the
    shard's path and the key; the same records from the folder, a glob and a brace range; nothing copied."""
    model, processor = model_and_processor
    folder = getattr(img2dataset_output, output_format)
    samples = img2dataset_samples(folder)
    assert len(samples) == 22
    images = [[PIL.Image.open(io.BytesIO(image)).convert("RGB")] for _, image, _ in samples]
    expected = generate_answers(model, processor, [f"<|image|>{PROMPT}"] * 22, images, max_new_tokens=4)
    assert len(set(expected)) > 1

    def refuse_arrow(*args, **kwargs):
        raise AssertionError("shards must be read where they lie, not loaded into an Arrow cache")

    monkeypatch.setattr(datasets, "load_dataset", refuse_arrow)
    output = tmp_path / "captions.jsonl"
    arguments = ["caption", "--data", str(folder), "--model", str(model_dir), "--output", str(output), "--prompt",
                 PROMPT, "--batch-size", "8", "--max-new-tokens", "4", "--no-progress"]  # fmt: skip
    with files_unchanged(folder):
        assert main(arguments) == 0
    header, *records = _lines(output)
    assert header["settings"]["data"] == str(folder)
    assert [r["id"] for r in records] == [key for key, _, _ in samples]
    assert [r["image"] for r in records] == [f"{folder}/{key}" for key, _, _ in samples]
    assert [r["text"] for r in records] == expected

    suffix = ".tar" if output_format == "webdataset" else ".parquet"
    for spec in (folder / f"*{suffix}", folder / f"{{00000..00003}}{suffix}"):
        again = caption_images(model, spec, tmp_path / f"{spec.name}.jsonl", processor=processor, prompt=PROMPT,
                               batch_size=5, max_new_tokens=4, progress=False)  # fmt: skip
        assert again == records


def test_docs_shard_commands_run(model_dir, img2dataset_output, tmp_path, monkeypatch):
    """docs/training.md's caption and eval commands on shards, as written, on img2dataset's output in place of /data
    and a tiny model in place of magma-v1."""
    import shlex

    from magma_hf.evaluation.caption_metrics import CaptionMetricsUnavailable, check_caption_requirements

    out = img2dataset_output
    replacements = {
        "/data/laion-shards/{00000..00009}.tar": str(out.webdataset / "{00000..00001}.tar"),
        "/data/laion-shards": str(out.webdataset),
        "/data/coco-shards": str(out.parquet),
        "magma-v1": str(model_dir),
    }
    (block,) = run_by(__file__, "test_docs_shard_commands_run")
    monkeypatch.chdir(tmp_path)
    commands = []
    for line in block.text.splitlines():
        for old, new in replacements.items():
            line = line.replace(old, new)
        commands.append(shlex.split(line))
    assert [words[:2] for words in commands] == [["magma-hf", "caption"]] * 2 + [["magma-hf", "eval"]]
    for words in commands[:2]:
        assert main(words[1:]) == 0
    assert len(_lines(tmp_path / "captions.jsonl")) == 1 + 22
    first_two = [r["id"].split("/")[0] for r in _lines(tmp_path / "first-shards.jsonl")[1:]]
    assert first_two == ["00000.tar"] * 7 + ["00001.tar"] * 7  # one broken url in each
    try:
        check_caption_requirements()
    except CaptionMetricsUnavailable:
        pytest.skip("the eval command needs the 'eval' extra and Java")
    assert main(commands[2][1:]) == 0
    result = json.loads((tmp_path / "results" / "coco.json").read_text())
    assert result["metrics"]["num_images"] == 22 and result["examples"][0]["id"].startswith("00000.parquet/")


def test_bad_shard_samples_are_handled_as_the_readers_handle_them(model_and_processor, tmp_path, caplog):
    """A sample without an image is skipped with a warning (captions are not needed); an undecodable image stops
    the run naming its shard and key, keeping the images done."""
    model, processor = model_and_processor
    write_tar(tmp_path / "00000.tar", [
        ("a.jpg", encoded_image(0)), ("a.txt", b"one"), ("b.jpg", encoded_image(1)),  # b: no caption
        ("c.txt", b"no image"), ("d.jpg", b"not a jpeg"), ("d.txt", b"corrupt"), ("e.jpg", encoded_image(2)),
    ])  # fmt: skip
    output = tmp_path / "out.jsonl"
    with caplog.at_level("WARNING"), pytest.raises(
        ValueError, match=r"Cannot read the image .*00000\.tar/d \(id '00000\.tar/d'\): ValueError: Unidentified"
    ):
        caption_images(model, tmp_path / "00000.tar", output, processor=processor, batch_size=1, max_new_tokens=2,
                       progress=False)  # fmt: skip
    assert [r["id"] for r in _lines(output)[1:]] == ["00000.tar/a", "00000.tar/b"]
    assert any("Skipping " in r.getMessage() and "00000.tar/c" in r.getMessage() for r in caplog.records)
    with pytest.raises(FileNotFoundError, match=r"1 of its 2 shards do not exist, first \['.*00001.tar'\]"):
        caption_images(model, tmp_path / "{00000..00001}.tar", tmp_path / "x.jsonl", processor=processor)
    for copy in ("one", "two"):
        (tmp_path / copy).mkdir()
        shutil.copy(tmp_path / "00000.tar", tmp_path / copy)
    with pytest.raises(ValueError, match=r"the sample key 00000.tar/a occurs twice \(.*one/00000.tar/a and .*two/"):
        caption_images(model, tmp_path / "*" / "00000.tar", tmp_path / "x.jsonl", processor=processor)


def test_vllm_engine_side(model_dir, model_and_processor, image_dir, tmp_path, monkeypatch):
    """`--engine vllm` against VllmGenerator's signature, with a stand-in that answers through generate_answers (the
    real engine is tested in tests/vllm/): the same records, its own model identity, and no mixing of engines."""
    import magma_hf.captioning as captioning

    model, processor = model_and_processor
    made = []

    def stand_in(model_path: str, max_new_tokens: int, **llm_kwargs):
        made.append((model_path, max_new_tokens, llm_kwargs))
        return lambda prompts, images: generate_answers(model, processor, prompts, images, max_new_tokens=3)

    monkeypatch.setattr(captioning, "vllm_generator", stand_in)
    reference = caption_images(model, image_dir, tmp_path / "t.jsonl", processor=processor, prompt=PROMPT,
                               max_new_tokens=3, progress=False)  # fmt: skip
    records = caption_images(str(model_dir), image_dir, tmp_path / "v.jsonl", prompt=PROMPT, max_new_tokens=3,
                             engine="vllm", dtype="float32", progress=False)  # fmt: skip
    assert records == reference and made == [(str(model_dir), 3, {"dtype": "float32"})]
    settings = _lines(tmp_path / "v.jsonl")[0]["settings"]
    assert settings["engine"] == "vllm" and settings["model_weights"].startswith("sha256:")
    with files_unchanged(tmp_path), pytest.raises(ValueError, match="engine: 'transformers' in the file, 'vllm' now"):
        caption_images(str(model_dir), image_dir, tmp_path / "t.jsonl", prompt=PROMPT, max_new_tokens=3,
                       engine="vllm", progress=False)  # fmt: skip


# ----------------------------------------------------------------------------------------- issue 18 B: bad inputs
def caption_arguments(data, model_dir, output):
    return ["caption", "--data", str(data), "--model", str(model_dir), "--output", str(output), "--batch-size", "1",
            "--max-new-tokens", "2", "--no-progress"]  # fmt: skip


def test_photos_beside_text_files_are_all_captioned(model_dir, image_dir, tmp_path, caplog):
    """Notes among the photos made the folder "img2dataset output": refused, or (a note named like a photo) only the
    photos with a note captioned, exit 0. An img2dataset folder's images are all captioned (captions are not used)."""
    photos = shutil.copytree(image_dir, tmp_path / "photos")
    for name in ("notes.txt", "b/README.txt", "1.txt"):
        (photos / name).write_text("my own notes")
    with caplog.at_level(logging.INFO):
        assert main(caption_arguments(photos, model_dir, tmp_path / "photos.jsonl")) == 0
    assert [r["id"] for r in _lines(tmp_path / "photos.jsonl")[1:]] == ["0.png", "1.png", "3.png", "4.png", "b/2.png"]
    assert any("photos: a folder of 5 image files" in record.getMessage() for record in caplog.records)

    i2d = tmp_path / "i2d" / "00000"
    i2d.mkdir(parents=True)
    for n in range(3):
        random_image(n).save(i2d / f"00{n}.png")
        if n < 2:  # the last one has no caption: the training readers skip it, captioning does not
            (i2d / f"00{n}.txt").write_text(f"image {n}")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(caption_arguments(i2d.parent, model_dir, tmp_path / "i2d.jsonl")) == 0
    assert [r["id"] for r in _lines(tmp_path / "i2d.jsonl")[1:]] == ["00000/000.png", "00000/001.png", "00000/002.png"]
    assert any("img2dataset `files` output: captioning all its 3 images" in r.getMessage() for r in caplog.records)


def test_a_bad_image_removed_then_the_same_command_completes(model_dir, image_dir, tmp_path, capsys, caplog):
    """The error's advice is followed to the end: remove the bad image, run the same command, and it completes."""
    photos = shutil.copytree(image_dir, tmp_path / "photos")
    (photos / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    output = tmp_path / "captions.jsonl"
    assert main(caption_arguments(photos, model_dir, output)) == 2
    assert "Fix or remove it, then run the same command again" in capsys.readouterr().err
    first = _lines(output)[1:]
    assert [r["id"] for r in first] == ["0.png"]
    (photos / "1.png").unlink()
    with caplog.at_level(logging.INFO):
        assert main(caption_arguments(photos, model_dir, output)) == 0  # today: refused as another run's log
    records = _lines(output)[1:]
    assert [r["id"] for r in records] == ["0.png", "3.png", "4.png", "b/2.png"] and records[0] == first[0]
    assert any("changed since" in r.getMessage() and "1 done" in r.getMessage() for r in caplog.records)
    with files_unchanged(tmp_path):  # complete: a rerun changes nothing
        assert main(caption_arguments(photos, model_dir, output)) == 0
    (photos / "0.png").unlink()  # one that was done: its text would be lost, so the rerun is refused
    with files_unchanged(tmp_path):
        assert main(caption_arguments(photos, model_dir, output)) == 2
    assert "has results for ids not in the data (e.g. ['0.png'])" in capsys.readouterr().err

    # Rows of a dataset are numbered: removing one renumbers the rest, so the advice there is to replace it.
    magma = tmp_path / "magma"
    (magma / "image_data").mkdir(parents=True)
    shutil.copytree(image_dir / "b", magma / "images")
    (magma / "images" / "bad.png").write_bytes(b"not an image")
    for row, name in enumerate(["2", "bad"]):
        sample = {"image_path": f"images/{name}.png", "captions": ["a caption"]}
        (magma / "image_data" / f"{row}.json").write_text(json.dumps(sample))
    output = tmp_path / "magma.jsonl"
    assert main(caption_arguments(magma, model_dir, output)) == 2
    assert "Replace it with a readable image in its place (the ids are row numbers" in capsys.readouterr().err
    shutil.copy(image_dir / "0.png", magma / "images" / "bad.png")
    assert main(caption_arguments(magma, model_dir, output)) == 0
    assert [r["id"] for r in _lines(output)[1:]] == ["0", "1"]


def test_a_file_name_that_is_not_utf8_is_named(model_dir, image_dir, tmp_path, capsys):
    """Linux allows any bytes in a file name, the JSONL output holds UTF-8: today a codec error naming no file."""
    photos = shutil.copytree(image_dir, tmp_path / "photos")
    random_image(9).save(os.fsdecode(bytes(photos / "b") + b"/caf\xe9.png"), format="PNG")
    with files_unchanged(tmp_path, no_new_files=True):
        assert main(caption_arguments(photos, model_dir, tmp_path / "captions.jsonl")) == 2
    out = capsys.readouterr().err
    assert "photos/b/caf\\xe9.png" in out and "not valid UTF-8" in out and "Rename them" in out
