"""The evaluation harness end to end on a tiny random MAGMA: prompts, output files, resumption, batching."""

import json

import pytest
import torch

from magma_hf import MagmaForConditionalGeneration
from magma_hf.evaluation.data import draw_support, load_eval_set, parse_columns
from magma_hf.evaluation.prompts import build_prompt
from magma_hf.evaluation.run import evaluate, results_log_path
from magma_hf.evaluation.vqa_metrics import gqa_accuracy, vqa_accuracy
from tests.helpers import (
    KILLED_AT_SECOND_FLUSH,
    encoded_image,
    files_unchanged,
    img2dataset_samples,
    random_image,
    write_tar,
)

# (image, question, ten answers, answer type); images 0 and 1 carry two questions each.
QUESTIONS = [
    (0, "What is in the picture?", ["a cat"] * 6 + ["cat"] * 4, "other"),
    (0, "Is it red?", ["yes"] * 10, "yes/no"),
    (1, "How many dogs?", ["two"] * 5 + ["2"] * 5, "number"),
    (1, "Is it a beach?", ["no"] * 7 + ["yes"] * 3, "yes/no"),
    (2, "What is the number?", ["seven"] * 10, "other"),
    (3, "What are they riding?", ["bicycles"] * 8 + ["bikes"] * 2, "other"),
    (4, "Is it night?", ["yes"] * 9 + ["no"], "yes/no"),
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory):
    """A VQA-style dataset in the original layout: images/0/*.png, image_data/0/*.json with the QA in metadata."""
    root = tmp_path_factory.mktemp("vqa")
    (root / "images" / "0").mkdir(parents=True)
    (root / "image_data" / "0").mkdir(parents=True)
    for image in {q[0] for q in QUESTIONS}:
        random_image(image).save(root / "images" / "0" / f"img{image}.png")
    for n, (image, question, answers, answer_type) in enumerate(QUESTIONS):
        sample = {
            "image_path": f"images/0/img{image}.png",
            "captions": [f"Q: {question} A: {answers[0]}"],
            "metadata": {
                "question": question,
                "answers": answers,
                "question_id": 100 + n,
                "image_id": image,
                "answer_type": answer_type,
            },
        }
        (root / "image_data" / "0" / f"{n}.json").write_text(json.dumps(sample))
    return root


def _essentials(records):
    return [(r["id"], r["prompt"], r["answer"], r["score"], r["support_ids"]) for r in records]


def test_prompts():
    assert build_prompt("vqa", "Is it red?", []) == "<|image|>Q: Is it red? A:"
    assert (
        build_prompt("okvqa", "Is it red?", [("What is it?", "a cat"), ("How many?", "2")])
        == "<|image|>Q: What is it? A: a cat\n<|image|>Q: How many? A: 2\n<|image|>Q: Is it red? A:"
    )
    assert build_prompt("caption", "", [("", "a dog on a beach")]) == "<|image|>a dog on a beach\n<|image|>"
    assert (
        build_prompt("caption", "", [("", "a dog")], "A picture of")
        == "<|image|>A picture of a dog\n<|image|>A picture of"
    )


def test_support_draw_is_seeded_and_excludes_the_query(vqa_dir):
    eval_set = load_eval_set(vqa_dir, "vqa")
    assert eval_set.ids == [100 + n for n in range(len(QUESTIONS))]
    assert eval_set.targets[0] == "a cat" and eval_set.targets[2] in ("two", "2")  # most common human answer
    for query in range(len(eval_set)):
        rows = draw_support(eval_set, 3, 0, eval_set.ids[query], eval_set.image_keys[query], exclude_query=True)
        assert rows == draw_support(eval_set, 3, 0, eval_set.ids[query], eval_set.image_keys[query], True)
        assert len(set(rows)) == 3 and query not in rows
        assert all(eval_set.image_keys[r] != eval_set.image_keys[query] for r in rows)
    draws = {tuple(draw_support(eval_set, 2, seed, 100)) for seed in range(10)}
    assert len(draws) > 1  # the seed matters
    with pytest.raises(ValueError, match="only 5 usable"):
        draw_support(eval_set, 6, 0, 100, eval_set.image_keys[0], exclude_query=True)


def test_zero_shot_vqa_output_file(vqa_dir, model_and_processor, tmp_path):
    model, processor = model_and_processor
    output = tmp_path / "zero.json"
    result = evaluate("vqa", model, processor, str(vqa_dir), batch_size=3, output=output, progress=False)

    lines = results_log_path(output).read_text().splitlines()
    header, records = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
    assert header["settings"]["shots"] == 0 and header["settings"]["task"] == "vqa"
    assert [r["id"] for r in records] == [100 + n for n in range(len(QUESTIONS))]
    for record, (_, question, answers, _) in zip(records, QUESTIONS):
        assert record["prompt"] == f"<|image|>Q: {question} A:"
        assert "\n" not in record["answer"] and record["answer"] == record["answer"].strip()
        assert record["score"] == vqa_accuracy(record["answer"], answers)
        assert record["references"] == answers and record["support_ids"] == []

    written = json.loads(output.read_text())
    assert written["examples"] == records == result["examples"]
    scores = [r["score"] for r in records]
    assert written["metrics"]["accuracy"] == pytest.approx(100 * sum(scores) / len(scores))
    assert written["metrics"]["num_questions"] == len(QUESTIONS)
    assert set(written["metrics"]["accuracy_per_answer_type"]) == {"other", "yes/no", "number"}

    one_by_one = evaluate("vqa", model, processor, str(vqa_dir), batch_size=1, progress=False)
    assert _essentials(one_by_one["examples"]) == _essentials(records)


def test_two_shot_resumes_and_batching_does_not_change_answers(vqa_dir, model_and_processor, tmp_path):
    model, processor = model_and_processor
    reference = evaluate("vqa", model, processor, str(vqa_dir), shots=2, batch_size=1, output=tmp_path / "ref.json")
    for record in reference["examples"]:
        assert record["prompt"].count("<|image|>") == 3 and record["prompt"].endswith(" A:")
        assert len(record["support_ids"]) == 2 and record["id"] not in record["support_ids"]
        for support_id in record["support_ids"]:
            _, question, answers, _ = QUESTIONS[support_id - 100]
            assert f"Q: {question} A: {max(answers, key=answers.count)}\n" in record["prompt"]

    # Interrupted after 3 questions (and killed while writing a 4th line), then started again, batched by 4.
    output = tmp_path / "resumed.json"
    partial = evaluate("vqa", model, processor, str(vqa_dir), shots=2, batch_size=4, output=output, limit=3)
    assert len(partial["examples"]) == 3
    log = results_log_path(output)
    with open(log, "a") as file:
        file.write('{"id": 103, "prompt": "<|ima')
    resumed = evaluate("vqa", model, processor, str(vqa_dir), shots=2, batch_size=4, output=output)

    assert _essentials(resumed["examples"]) == _essentials(reference["examples"])
    assert resumed["metrics"] == reference["metrics"]
    assert len(log.read_text().splitlines()) == 1 + len(QUESTIONS)  # the torn line is gone, nothing doubled

    with pytest.raises(ValueError, match="shots: 2 in the file, 1 now"):
        evaluate("vqa", model, processor, str(vqa_dir), shots=1, output=output)
    log.unlink()
    with pytest.raises(ValueError, match="cannot resume"):  # results without their log are never overwritten
        evaluate("vqa", model, processor, str(vqa_dir), shots=2, output=output)


def test_cli_gqa_on_a_hf_dataset_with_a_column_mapping(model_dir, tmp_path, capsys):
    import datasets

    from magma_hf.cli import main

    rows = {
        "img": [random_image(10 + n) for n in range(3)],
        "q": ["Is it red?", "What is it?", "How many?"],
        "a": ["yes", "a table", "two"],
        "qid": ["g1", "g2", "g3"],
    }
    datasets.Dataset.from_dict(rows).cast_column("img", datasets.Image()).save_to_disk(str(tmp_path / "gqa"))
    output = tmp_path / "gqa.json"
    argv = [
        "eval",
        "--task",
        "gqa",
        "--data",
        str(tmp_path / "gqa"),
        "--model",
        str(model_dir),
        "--output",
        str(output),
    ]
    argv += ["--columns", "image=img,question=q,answers=a,question_id=qid", "--batch-size", "2", "--no-progress"]
    assert main(argv) == 0
    result = json.loads(output.read_text())
    assert [r["id"] for r in result["examples"]] == ["g1", "g2", "g3"]
    for record, answer in zip(result["examples"], rows["a"]):
        assert record["score"] == gqa_accuracy(record["answer"], answer)
    assert "gqa 0-shot" in capsys.readouterr().out


def _skip_without_caption_tool():
    from magma_hf.evaluation.caption_metrics import CaptionMetricsUnavailable, check_caption_requirements

    try:
        check_caption_requirements()
    except CaptionMetricsUnavailable:
        pytest.skip("captioning needs the 'eval' extra and Java")


def test_caption_task(model_and_processor, tmp_path):
    _skip_without_caption_tool()
    root = tmp_path / "captions"
    (root / "images" / "0").mkdir(parents=True)
    (root / "image_data" / "0").mkdir(parents=True)
    captions = [["a cat on a red sofa", "a cat"], ["a dog on the beach"], ["two people riding bicycles"], ["a house"]]
    for n, references in enumerate(captions):
        random_image(20 + n).save(root / "images" / "0" / f"{n}.png")
        sample = {"image_path": f"images/0/{n}.png", "captions": references, "metadata": {"image_id": f"im{n}"}}
        (root / "image_data" / "0" / f"{n}.json").write_text(json.dumps(sample))
    model, processor = model_and_processor
    result = evaluate("caption", model, processor, str(root), shots=1, batch_size=2, progress=False)
    metrics = result["metrics"]
    assert set(metrics) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr-D", "num_images"}
    assert metrics["num_images"] == 4
    for record, references in zip(result["examples"], captions):
        assert record["references"] == references
        assert record["prompt"].count("<|image|>") == 2 and record["prompt"].endswith("\n<|image|>")
        shown = captions[int(record["support_ids"][0][2:])][0]  # a support example shows its first caption
        assert record["prompt"] == f"<|image|>{shown}\n<|image|>"
        assert set(record["score"]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr-D"}


@pytest.mark.parametrize("output_format", ["webdataset", "parquet"])
def test_caption_task_on_img2dataset_shards(model_dir, model_and_processor, img2dataset_output, tmp_path,
                                            monkeypatch, capsys, output_format):  # fmt: skip
    """img2dataset's own output, read where it lies: the references are each downloaded sample's caption, ids its
    key; 0-shot answers are generate_answers' for its images; few-shot examples come from the shards themselves."""
    import io

    import datasets
    from PIL import Image

    from magma_hf.cli import main
    from magma_hf.generation import generate_answers

    _skip_without_caption_tool()
    model, processor = model_and_processor
    folder = getattr(img2dataset_output, output_format)
    samples = img2dataset_samples(folder)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("shards were loaded into Arrow"))

    eval_set = load_eval_set(str(folder), "caption")
    assert eval_set.ids == [key for key, _, _ in samples] and eval_set.image_keys == eval_set.ids
    assert eval_set.references == [[caption] for _, _, caption in samples]
    images = [Image.open(io.BytesIO(image)).convert("RGB") for _, image, _ in samples]
    assert list(eval_set.image(5).getdata()) == list(images[5].getdata())

    output = tmp_path / "caption.json"
    argv = ["eval", "--task", "caption", "--data", str(folder), "--model", str(model_dir), "--output", str(output),
            "--batch-size", "8", "--max-new-tokens", "4", "--no-progress"]  # fmt: skip
    with files_unchanged(folder):
        assert main(argv) == 0
    result = json.loads(output.read_text())
    expected = generate_answers(model, processor, ["<|image|>"] * 22, [[i] for i in images], max_new_tokens=4)
    assert [r["id"] for r in result["examples"]] == eval_set.ids
    assert [r["answer"] for r in result["examples"]] == expected
    assert [r["references"] for r in result["examples"]] == eval_set.references
    assert result["metrics"]["num_images"] == 22 and result["settings"]["data"] == str(folder)
    assert "caption 0-shot" in capsys.readouterr().out

    # The shard files one by one (as a shell expands `out/*.tar`), one shot drawn from them, never the query itself.
    suffix = ".tar" if output_format == "webdataset" else ".parquet"
    files = [str(path) for path in sorted(folder.glob(f"*{suffix}"))]
    result = evaluate("caption", model, processor, files, shots=1, limit=6, batch_size=3, max_new_tokens=4,
                      output=tmp_path / "one-shot.json", progress=False)  # fmt: skip
    for record in result["examples"]:
        (support,) = record["support_ids"]
        assert support != record["id"] and support in eval_set.ids
        assert record["prompt"] == f"<|image|>{eval_set.targets[eval_set.index_of(support)]}\n<|image|>"


def test_caption_shards_that_cannot_be_scored_are_named(tmp_path):
    write_tar(tmp_path / "00000.tar", [
        ("a.jpg", encoded_image(0)), ("a.json", b'{"image_id": 7, "caption": "from the json"}'),
        ("b.jpg", encoded_image(1)), ("b.txt", b"  "), ("c.txt", b"no image"), ("d.jpg", encoded_image(2)),
    ])  # fmt: skip
    named = r"3 of 4 samples cannot be scored: .*00000\.tar/b \(no captions\); .*00000\.tar/c \(missing image"
    with pytest.raises(ValueError, match=named + ".*Evaluation scores every sample: fix or remove them"):
        load_eval_set(str(tmp_path / "00000.tar"), "caption")
    (tmp_path / "good").mkdir()
    write_tar(tmp_path / "good" / "00000.tar", [("a.jpg", encoded_image(0)), ("a.json", b'{"image_id": 7}'),
                                                ("a.txt", b"a caption")])  # fmt: skip
    assert load_eval_set(str(tmp_path / "good"), "caption").ids == [7]  # the sample's image_id, where it has one
    with pytest.raises(ValueError, match=r"shards map only the image and captions columns, not \['question'\]"):
        load_eval_set(str(tmp_path / "good"), "caption", columns="question=q")


def test_data_errors_are_named(vqa_dir, tmp_path):
    import datasets

    with pytest.raises(ValueError, match="Unknown field"):
        parse_columns("picture=img")
    dataset = datasets.Dataset.from_dict({"image": [random_image(0)], "query": ["Is it red?"], "answers": [["yes"]]})
    with pytest.raises(ValueError, match="no 'question' column"):
        load_eval_set(dataset, "vqa")
    assert load_eval_set(dataset, "vqa", columns={"question": "query"}).prompts == ["Is it red?"]
    with pytest.raises(ValueError, match="one answer per question"):
        load_eval_set(dataset.map(lambda row: {"answers": ["yes", "no"]}), "gqa", columns="question=query")

    broken = tmp_path / "broken"
    (broken / "image_data" / "0").mkdir(parents=True)
    (broken / "image_data" / "0" / "0.json").write_text((vqa_dir / "image_data" / "0" / "0.json").read_text())
    (broken / "images").symlink_to(vqa_dir / "images")
    sample = json.loads((vqa_dir / "image_data" / "0" / "1.json").read_text())
    sample["captions"] = []  # the reader drops samples without captions: evaluation must not lose them silently
    (broken / "image_data" / "0" / "1.json").write_text(json.dumps(sample))
    with pytest.raises(ValueError, match="1 of 2 samples were skipped"):
        load_eval_set(broken, "vqa")


def test_docs_examples_run(model_dir, tmp_path, monkeypatch):
    """docs/evaluation.md's Python blocks, in order, on the official VQA file formats and a tiny model."""
    import re
    from pathlib import Path

    import datasets

    _skip_without_caption_tool()
    doc = (Path(__file__).parents[2] / "docs" / "evaluation.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    (tmp_path / "val2014").mkdir()
    questions, annotations = [], []
    for n, (image, question, answers, answer_type) in enumerate(QUESTIONS[:4]):
        random_image(image).save(tmp_path / "val2014" / f"COCO_val2014_{image:012d}.jpg")
        questions.append({"question_id": 100 + n, "image_id": image, "question": question})
        annotations.append({
            "question_id": 100 + n, "image_id": image, "answer_type": answer_type, "question_type": "what",
            "multiple_choice_answer": answers[0],
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)],
        })  # fmt: skip
    Path("v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": questions}))
    Path("v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": annotations}))
    coco = {"image": [random_image(30 + n) for n in range(3)], "captions": [["a cat"], ["a dog", "a puppy"], ["a car"]]}
    datasets.Dataset.from_dict(coco).cast_column("image", datasets.Image()).save_to_disk("data/coco_captions_test")

    namespace: dict = {}
    for block in blocks:
        exec(compile(block.replace('"magma-v1"', f'"{model_dir}"'), "docs/evaluation.md", "exec"), namespace)
    vqa = json.loads(Path("results/vqa-2shot.json").read_text())
    assert [r["id"] for r in vqa["examples"]] == [100, 101, 102, 103]
    assert all(r["prompt"].count("<|image|>") == 3 for r in vqa["examples"])
    assert namespace["result"]["metrics"]["num_images"] == 3


# ------------------------------------------------------------------------------------------- the log and its resume
def _log_lines(output) -> list[dict]:
    return [json.loads(line) for line in results_log_path(output).read_text().splitlines()]


def test_resume_with_another_model_or_dtype_is_refused(vqa_dir, model_dir, model_and_processor, tmp_path):
    import shutil

    model, processor = model_and_processor
    output = tmp_path / "runs" / "vqa.json"
    evaluate("vqa", model, processor, str(vqa_dir), output=output, limit=3, progress=False)

    other = MagmaForConditionalGeneration.from_pretrained(model_dir).eval()
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3  # one weight of 400 thousand
    with (
        files_unchanged(tmp_path / "runs"),
        pytest.raises(ValueError, match=r"model_weights: 'sha256:\w+' in the file"),
    ):
        evaluate("vqa", other, processor, str(vqa_dir), output=output, progress=False)
    with (
        files_unchanged(tmp_path / "runs"),
        pytest.raises(ValueError, match="dtype: 'float32' in the file, 'bfloat16'"),
    ):
        evaluate("vqa", other.to(torch.bfloat16), processor, str(vqa_dir), output=output, progress=False)

    header = _log_lines(output)[0]["settings"]
    assert header["model_weights"].startswith("sha256:") and header["dtype"] == "float32"
    # The same weights from a copy of the folder (new mtimes, another path) are the same model: the run resumes.
    shutil.copytree(model_dir, tmp_path / "copy")
    resumed = evaluate("vqa", str(tmp_path / "copy"), None, str(vqa_dir), output=output, device="cpu", progress=False)
    assert len(resumed["examples"]) == len(QUESTIONS) and len(_log_lines(output)) == 1 + len(QUESTIONS)


def test_resume_with_other_data_seed_or_support_is_refused(vqa_dir, model_and_processor, tmp_path):
    import shutil

    import datasets

    model, processor = model_and_processor
    data = tmp_path / "vqa"
    shutil.copytree(vqa_dir, data)
    output = tmp_path / "runs" / "vqa.json"
    evaluate("vqa", model, processor, str(data), shots=1, output=output, limit=2, progress=False)

    def refused(match, **changes):
        arguments = dict(dataset=str(data), shots=1, output=output, progress=False) | changes
        with files_unchanged(tmp_path), pytest.raises(ValueError, match=match):
            evaluate("vqa", model, processor, **arguments)

    refused("seed: 0 in the file, 1 now", seed=1)
    refused(f"data: '{data}' in the file, '{vqa_dir}' now", dataset=str(vqa_dir))  # the same questions elsewhere
    refused("support: 'the evaluation data' in the file", support=str(vqa_dir))
    refused("max_new_tokens: 10 in the file, 3 now", max_new_tokens=3)
    # The same ids, one answer changed: the questions' fingerprint differs.
    sample = data / "image_data" / "0" / "5.json"
    sample.write_text(sample.read_text().replace('"bikes"', '"bicycle"'))
    refused(r"data_questions: 'sha256:\w+' in the file, 'sha256:\w+' now")

    # A split is part of the data: the same rows under another split are another data set.
    rows = {
        "image": [random_image(n) for n in range(2)],
        "question": ["Is it red?", "How many?"],
        "answers": ["a", "b"],
    }
    split = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    datasets.DatasetDict(val=split, test=split).save_to_disk(str(tmp_path / "hf"))
    hf_output = tmp_path / "runs" / "hf.json"
    evaluate("gqa", model, processor, str(tmp_path / "hf"), split="val", output=hf_output, limit=1, progress=False)
    with files_unchanged(tmp_path), pytest.raises(ValueError, match="split: 'val' in the file, 'test' now"):
        evaluate("gqa", model, processor, str(tmp_path / "hf"), split="test", output=hf_output, progress=False)


def test_a_log_of_the_previous_format_is_not_continued(vqa_dir, model_and_processor, tmp_path):
    """magma_hf.evaluation/1 logs recorded names only: resuming one cannot tell whether it is the same model."""
    model, processor = model_and_processor
    output = tmp_path / "vqa.json"
    evaluate("vqa", model, processor, str(vqa_dir), output=output, limit=2, progress=False)
    records = _log_lines(output)[1:]
    old_settings = {"task": "vqa", "shots": 0, "seed": 0, "max_new_tokens": 10, "prompt_template": None}
    old_settings |= {"support": None, "model": str(model.name_or_path), "data": str(vqa_dir), "batch_size": 8}
    lines = [{"format": "magma_hf.evaluation/1", "settings": old_settings}, *records]
    results_log_path(output).write_text("".join(json.dumps(line) + "\n" for line in lines))
    output.unlink()
    with files_unchanged(tmp_path), pytest.raises(ValueError, match="in the format 'magma_hf.evaluation/1'.*earlier"):
        evaluate("vqa", model, processor, str(vqa_dir), output=output, progress=False)


def test_files_beside_the_output_are_never_touched(vqa_dir, model_and_processor, tmp_path):
    model, processor = model_and_processor
    output = tmp_path / "vqa.json"
    (tmp_path / "vqa.json.tmp").write_text("the user's own notes\n")  # the old fixed temporary name
    (tmp_path / ".vqa.json.backup.tmp").write_text("the user's\n")
    (tmp_path / ".vqa.json.x1_9abcd.tmp").write_text('{"task": "vq')  # what a write killed midway leaves
    with files_unchanged(tmp_path, may_change=[".vqa.json.x1_9abcd.tmp"]):
        evaluate("vqa", model, processor, str(vqa_dir), output=output, limit=1, progress=False)
    names = [".vqa.json.backup.tmp", "vqa.json", "vqa.json.tmp", "vqa.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # the leftover is gone, nothing else
    (tmp_path / "folder.json").mkdir()
    with files_unchanged(tmp_path), pytest.raises(ValueError, match="folder.json is a folder"):
        evaluate("vqa", model, processor, str(vqa_dir), output=tmp_path / "folder.json", progress=False)
    with files_unchanged(tmp_path), pytest.raises(ValueError, match="vqa.json is a file, not a folder"):
        evaluate("vqa", model, processor, str(vqa_dir), output=tmp_path / "vqa.json" / "b.json", progress=False)
    # a results file put beside another run's log (here: one of another seed) is not replaced by that run's results
    evaluate("vqa", model, processor, str(vqa_dir), shots=1, seed=1, output=tmp_path / "s1.json", limit=1)
    (tmp_path / "vqa.json").write_bytes((tmp_path / "s1.json").read_bytes())
    with files_unchanged(tmp_path), pytest.raises(ValueError, match="vqa.json holds the results of another run"):
        evaluate("vqa", model, processor, str(vqa_dir), output=output, limit=1, progress=False)
    (tmp_path / "mine.jsonl").write_bytes(b"\xff\xfe user's log\n")  # a file that only shares the log's name
    with files_unchanged(tmp_path), pytest.raises(ValueError, match="mine.jsonl is not a magma_hf evaluation log"):
        evaluate("vqa", model, processor, str(vqa_dir), output=tmp_path / "mine.json", progress=False)


# Evaluates with its log opened through a file that, at the second batch's flush, writes all of the batch but the
# last newline, and then SIGKILLs its own process: the kill lands mid-append at a known byte.
CHILD = """
import os, signal, sys
import torch
import magma_hf.jobs as records
import magma_hf.evaluation.run as evaluation

torch.set_num_threads(1)
model_dir, data_dir, output = sys.argv[1:]


""" + KILLED_AT_SECOND_FLUSH + """
records.open = open_log  # the module's `open`: only the harness's appends to its log go through it
evaluation.evaluate("vqa", model_dir, dataset=data_dir, shots=2, batch_size=2, output=output, progress=False)
"""


def test_killed_while_appending_to_the_log_resumes(vqa_dir, model_dir, model_and_processor, tmp_path):
    import signal
    import subprocess
    import sys

    model, processor = model_and_processor
    output = tmp_path / "vqa.json"
    (tmp_path / "child.py").write_text(CHILD)
    command = [sys.executable, str(tmp_path / "child.py"), str(model_dir), str(vqa_dir), str(output)]
    with files_unchanged(vqa_dir, model_dir):
        child = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    killed = results_log_path(output).read_bytes()
    complete = killed[: killed.rfind(b"\n") + 1]
    assert complete.count(b"\n") == 1 + 3 and not killed.endswith(b"\n")  # header, 3 records, the 4th torn

    resumed = evaluate("vqa", model, processor, str(vqa_dir), shots=2, batch_size=2, output=output, progress=False)
    log = results_log_path(output).read_bytes()
    assert log.startswith(complete)  # appended after the complete lines, nothing rewritten
    lines = _log_lines(output)  # every line is one whole record
    assert [line["id"] for line in lines[1:]] == [100 + n for n in range(len(QUESTIONS))]
    reference = evaluate("vqa", model, processor, str(vqa_dir), shots=2, batch_size=1, progress=False)
    assert _essentials(resumed["examples"]) == _essentials(reference["examples"])
    with files_unchanged(tmp_path, may_change=["vqa.json"]):  # a finished run started again: the log stays
        again = evaluate("vqa", model, processor, str(vqa_dir), shots=2, output=output, progress=False)
    assert again["metrics"] == resumed["metrics"]


# ----------------------------------------------------------------------------------------------------- bad inputs
def test_bad_settings_are_named_before_anything_is_written(vqa_dir, model_and_processor, tmp_path):
    model, processor = model_and_processor
    output = tmp_path / "vqa.json"

    def refused(match, task="vqa", dataset=str(vqa_dir), **arguments):
        with files_unchanged(tmp_path, no_new_files=True), pytest.raises(ValueError, match=match):
            evaluate(task, model, processor, dataset, output=output, progress=False, **arguments)

    refused("Unknown task 'vqa2'; tasks are vqa, okvqa, gqa, caption", task="vqa2")
    refused("6-shot prompts need 6 support examples; .* has only 5 usable for example 100", shots=6)
    small = load_eval_set(vqa_dir, "vqa").select(2)
    refused("3-shot prompts need 3 support examples; .* has only 2 usable", shots=3, support=small)
    refused(r"support_split='train' \(--support-split\) is given without support data", support_split="train")
    refused("limit must be an integer >= 1, got 0", limit=0)
    refused("max_new_tokens must be an integer >= 1, got -1", max_new_tokens=-1)
    refused(
        r"template 'Q: \{question\} A: \{answer\}' is not a format string .*KeyError",
        prompt_template="Q: {question} A: {answer}",
    )
    no_answers = tmp_path.parent / f"{tmp_path.name}-data"
    import shutil

    shutil.copytree(vqa_dir, no_answers)
    sample = no_answers / "image_data" / "0" / "3.json"
    sample.write_text(sample.read_text().replace('"answers"', '"responses"'))
    refused(r"example 103 \(row 3\) has no answers", dataset=str(no_answers))
    # the shots were too many: the corrected run is not blocked by a log of the failed one
    evaluate("vqa", model, processor, str(vqa_dir), shots=2, output=output, limit=1, progress=False)


def test_cli_reads_the_data_before_loading_the_model(vqa_dir, tmp_path, capsys):
    import datasets

    from magma_hf.cli import main

    rows = {"image": [random_image(0)], "query": ["Is it red?"], "answers": [["yes"]]}
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "data"))
    argv = ["eval", "--task", "vqa", "--data", str(tmp_path / "data"), "--model", str(tmp_path / "no-model")]
    with files_unchanged(tmp_path):
        assert main(argv + ["--output", str(tmp_path / "out.json"), "--no-progress"]) == 2
    assert "no 'question' column" in capsys.readouterr().err
    argv[argv.index("--data") + 1] = str(vqa_dir)
    with files_unchanged(tmp_path):
        assert main(argv + ["--output", str(tmp_path / "out.json"), "--no-progress"]) == 2
    out = capsys.readouterr().err  # the refusal's line, after the data reader's progress bar (also on stderr)
    assert out.splitlines()[-1] == f"error: there is no model folder {tmp_path / 'no-model'}" and out.endswith("\n")
