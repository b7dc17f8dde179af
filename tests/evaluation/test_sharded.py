"""`magma-hf eval` and `magma-hf caption` sharded over 2 CPU processes by `accelerate launch`, against one process.

Two launches (a process costs seconds to start): the first captions a folder and then evaluates with process 1
SIGKILLed while appending its second batch; the second reruns that evaluation, continues a one-process evaluation
log and a torn one-process caption log. Each result must equal the one-process run's, answer for answer.
"""

import json
import shutil

import pytest

from magma_hf.captioning import caption_images
from magma_hf.evaluation.run import evaluate, results_log_path
from magma_hf.jobs import load_model_and_processor
from tests.helpers import KILLED_AT_SECOND_FLUSH, accelerate_launch, random_image, save_answering_model

pytestmark = pytest.mark.slow  # accelerate launch: two processes

N_QUESTIONS, N_IMAGES = 12, 6
QUESTIONS = ["What is in the picture?", "Is it red?", "How many dogs?", "Is it night?"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny MAGMA, 12 questions on 6 images in the original layout, and a folder of 7 images."""
    root = tmp_path_factory.mktemp("sharded")
    save_answering_model(root / "model")
    vqa = root / "vqa"
    (vqa / "images" / "0").mkdir(parents=True)
    (vqa / "image_data" / "0").mkdir(parents=True)
    for image in range(N_IMAGES):
        random_image(image).save(vqa / "images" / "0" / f"{image}.png")
    for n in range(N_QUESTIONS):
        question, answers = QUESTIONS[n % 4], ["yes"] * 6 + ["no"] * 4 if n % 2 else ["a cat"] * 10
        sample = {
            "image_path": f"images/0/{n % N_IMAGES}.png",
            "captions": [f"Q: {question} A: {answers[0]}"],
            "metadata": {"question": question, "answers": answers, "question_id": 500 + n, "image_id": n % N_IMAGES},
        }
        (vqa / "image_data" / "0" / f"{n:02d}.json").write_text(json.dumps(sample))
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    for n in range(7):
        random_image(10 + n).save(images / ("sub" if n % 3 == 0 else "") / f"{n}.png")
    return root


def _eval_args(root, output, limit=None):
    arguments = ["eval", "--task", "vqa", "--data", str(root / "vqa"), "--model", str(root / "model"), "--shots", "1",
                 "--batch-size", "2", "--output", str(output), "--no-progress"]  # fmt: skip
    return arguments + (["--limit", str(limit)] if limit else [])


def _caption_args(root, output):
    return ["caption", "--data", str(root / "images"), "--model", str(root / "model"), "--output", str(output),
            "--prompt", "A picture of", "--batch-size", "2", "--max-new-tokens", "5", "--no-progress"]  # fmt: skip


# Process 1's log is opened through a file that, at its second flush, writes all of the batch but the last newline
# and SIGKILLs the process: the kill lands mid-append; torchrun then stops process 0.
KILLED = """
import json, os, signal, sys
import magma_hf.jobs as records
from magma_hf.cli import main

caption_args, eval_args = json.loads(sys.argv[1]), json.loads(sys.argv[2])
assert main(caption_args) == 0


""" + KILLED_AT_SECOND_FLUSH + """
if os.environ["RANK"] == "1":
    records.open = open_log
sys.exit(main(eval_args))
"""

RERUN = """
import json, sys
from magma_hf.cli import main

for arguments in json.loads(sys.argv[1]):
    assert main(arguments) == 0, arguments
"""


def _essentials(result):
    return [(r["id"], r["prompt"], r["answer"], r["score"], r["support_ids"]) for r in result["examples"]]


def _log_ids(log_path):
    return [json.loads(line)["id"] for line in log_path.read_text().splitlines()[1:]]


def test_two_processes_equal_one_and_resume_after_a_kill(folders, tmp_path):
    root = folders
    model, processor = load_model_and_processor(root / "model", device="cpu")
    reference = evaluate("vqa", model, processor, str(root / "vqa"), shots=1, batch_size=2, progress=False)
    one_process = tmp_path / "one-process.jsonl"
    caption_images(model, root / "images", one_process, processor=processor, prompt="A picture of", batch_size=2,
                   max_new_tokens=5, progress=False)  # fmt: skip
    # What one process leaves when it is killed after 3 images, mid-line.
    torn = one_process.read_bytes().split(b"\n")
    (tmp_path / "torn.jsonl").write_bytes(b"\n".join(torn[:4]) + b"\n" + torn[4][:20])
    # A one-process evaluation of the first 5 questions, to be continued by two processes.
    evaluate("vqa", str(root / "model"), dataset=str(root / "vqa"), shots=1, batch_size=2, limit=5,
             output=tmp_path / "partial.json", progress=False)  # fmt: skip

    (tmp_path / "killed.py").write_text(KILLED)
    vqa = tmp_path / "vqa.json"
    killed = accelerate_launch(
        [str(tmp_path / "killed.py"), json.dumps(_caption_args(root, tmp_path / "sharded.jsonl")),
         json.dumps(_eval_args(root, vqa))], cwd=tmp_path,
    )  # fmt: skip
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert (tmp_path / "sharded.jsonl").read_text() == one_process.read_text(), killed.stderr[-3000:]
    process_log = tmp_path / "vqa.process-1.jsonl"
    assert process_log.is_file() and not process_log.read_bytes().endswith(b"\n"), killed.stderr[-3000:]
    # Complete lines after each header (process 0, stopped by torchrun, may have been cut mid-line too).
    done_before = sum(path.read_bytes().count(b"\n") - 1 for path in (results_log_path(vqa), process_log))
    assert 0 < done_before < N_QUESTIONS
    (tmp_path / "copy").mkdir()  # the killed run's state, to be resumed by one process
    for path in (results_log_path(vqa), process_log):
        shutil.copy(path, tmp_path / "copy" / path.name)

    (tmp_path / "rerun.py").write_text(RERUN)
    rerun = accelerate_launch(
        [str(tmp_path / "rerun.py"), json.dumps([_eval_args(root, vqa), _eval_args(root, tmp_path / "partial.json"),
                                                 _caption_args(root, tmp_path / "torn.jsonl")])], cwd=tmp_path,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    expected_ids = [500 + n for n in range(N_QUESTIONS)]
    for output in (vqa, tmp_path / "partial.json"):
        result = json.loads(output.read_text())
        assert _essentials(result) == _essentials(reference)
        assert result["metrics"] == reference["metrics"]
        assert _log_ids(results_log_path(output)) == expected_ids  # one log, in the data's order
    assert not list(tmp_path.glob("*.process-*"))  # merged, then removed
    torn_lines = (tmp_path / "torn.jsonl").read_text().splitlines()
    assert torn_lines[1:] == one_process.read_text().splitlines()[1:]

    resumed = evaluate("vqa", model, processor, str(root / "vqa"), shots=1, batch_size=2,
                       output=tmp_path / "copy" / "vqa.json", progress=False)  # fmt: skip
    assert _essentials(resumed) == _essentials(reference) and resumed["metrics"] == reference["metrics"]
    assert _log_ids(tmp_path / "copy" / "vqa.jsonl") == expected_ids
    assert not (tmp_path / "copy" / "vqa.process-1.jsonl").exists()
