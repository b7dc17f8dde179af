"""img2dataset's real output (the session's `img2dataset_output`: 28 urls served on 127.0.0.1, 6 broken, 8 per shard)
as the readers meet it: its files, the stream over it, and random access to it for captioning and evaluation.
Captioning, evaluating and training on it: tests/evaluation, tests/training."""

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from torchdata.stateful_dataloader import StatefulDataLoader

from magma_hf.data.shards import ShardIndex, open_shards
from magma_hf.data.sources import detect_layout, reads_as_shards
from magma_hf.data.streaming import build_stream
from tests.helpers import IMG2DATASET_BROKEN, IMG2DATASET_IMAGE_SIZE

REPO = Path(__file__).resolve().parents[2]
SHARDS = ["00000", "00001", "00002", "00003"]  # 28 rows, 8 per shard


def test_its_output_is_shards_with_their_parquet_and_stats(img2dataset_output):
    out = img2dataset_output
    stats_names = [f"{shard}_stats.json" for shard in SHARDS]
    wds_files = sorted(p.name for p in out.webdataset.iterdir())
    assert wds_files == sorted([f"{s}.tar" for s in SHARDS] + [f"{s}.parquet" for s in SHARDS] + stats_names)
    assert sorted(p.name for p in out.parquet.iterdir()) == sorted([f"{s}.parquet" for s in SHARDS] + stats_names)

    stats = [json.loads((out.parquet / name).read_text()) for name in stats_names]
    assert sum(s["count"] for s in stats) == 28 and sum(s["successes"] for s in stats) == len(out.captions) == 22
    assert sum(s["failed_to_download"] for s in stats) == 4  # three 404s and the refused connection
    assert sum(s["failed_to_resize"] for s in stats) == 2  # the files that are not images
    assert stats[3]["successes"] == 0  # its last shard: every url broken

    # The parquet output holds every row, failed ones with status and no image; the webdataset's parquet beside
    # each tar is the same metadata without the images.
    table = pq.read_table(out.parquet / "00003.parquet").to_pylist()  # rows in download order, not url order
    assert Counter(row["status"] for row in table) == {"failed_to_download": 3, "failed_to_resize": 1}
    assert all(row["jpg"] is None and row["error_message"] for row in table)
    assert sorted(row["caption"] for row in table) == sorted(out.failed[-4:])
    columns = pq.read_schema(out.parquet / "00000.parquet").names
    assert {"key", "url", "caption", "status", "error_message", "width", "height", "jpg"} <= set(columns)
    assert "jpg" not in pq.read_schema(out.webdataset / "00000.parquet").names

    assert detect_layout(out.webdataset) == "webdataset" and detect_layout(out.parquet) == "parquet"
    assert reads_as_shards(out.webdataset) and reads_as_shards(out.parquet)
    assert (out.webdataset / "00003.tar").stat().st_size > 0  # an empty tar, not a missing one


def read_rows(folder, ranks: int, workers: int) -> list[dict]:
    """One pass of the stream over `ranks` processes x `workers` data-loader workers."""
    rows = []
    for rank in range(ranks):
        stream = build_stream(str(folder), repeat=False, shuffle_buffer_size=4, seed=1).distribute(rank, ranks)
        loader = StatefulDataLoader(stream, batch_size=5, num_workers=workers, collate_fn=lambda batch: batch)
        rows += [row for batch in loader for row in batch]
    return rows


@pytest.mark.parametrize("output_format", ["webdataset", "parquet"])
def test_the_stream_reads_every_downloaded_sample_once_and_no_failed_one(img2dataset_output, output_format):
    out = img2dataset_output
    rows = read_rows(getattr(out, output_format), ranks=2, workers=2)
    assert Counter(caption for row in rows for caption in row["captions"]) == Counter(out.captions)
    assert len({row["key"] for row in rows}) == len(rows) == 22
    assert all(row["problem"] is None for row in rows)
    assert {row["image"].size for row in rows} == {(IMG2DATASET_IMAGE_SIZE, IMG2DATASET_IMAGE_SIZE)}
    urls = [json.loads(row["metadata"])["url"] for row in rows]  # img2dataset's metadata travels with the sample
    assert sorted(int(url.rsplit("/", 1)[1].split(".")[0]) for url in urls) == [
        row for row in range(28) if row not in IMG2DATASET_BROKEN
    ]


@pytest.mark.parametrize("output_format", ["webdataset", "parquet"])
def test_random_access_reads_the_same_samples_without_holding_images(img2dataset_output, output_format):
    folder = getattr(img2dataset_output, output_format)
    index = ShardIndex(open_shards(str(folder)))
    assert len(index) == 22 and len(set(index.keys)) == 22
    suffix = ".tar" if output_format == "webdataset" else ".parquet"
    assert all(key.split("/")[0].endswith(suffix) for key in index.keys)
    assert all(label == f"{folder}/{key}" for label, key in zip(index.labels, index.keys))
    assert sorted(sample.captions for sample in index.samples) == sorted(img2dataset_output.captions)
    assert not any(isinstance(sample.image, bytes) for sample in index.samples)  # where the image is, not its bytes
    streamed = {row["key"].split(":", 1)[1]: row["image"] for row in read_rows(folder, ranks=1, workers=0)}
    for position in (0, 9, 21, 3):  # out of order, across shards (and parquet row groups)
        image = index.open_image(position)
        assert list(image.getdata()) == list(streamed[index.keys[position]].getdata())


def test_the_documented_img2dataset_commands_are_the_python_example_the_fixture_runs():
    """The README's and docs/training.md's `img2dataset` command lines give img2dataset's own options, the same as the
    Python example (run by the img2dataset_output fixture): what runs in the tests is what the commands do."""
    import ast
    import inspect
    import re
    import shlex

    from img2dataset import download

    from tests.doc_blocks import documents, run_by

    (example,) = run_by(REPO / "tests" / "conftest.py", "img2dataset_output")
    call = next(node for node in ast.walk(ast.parse(example.text)) if getattr(node, "func", None) is not None)
    python = {keyword.arg: str(ast.literal_eval(keyword.value)) for keyword in call.keywords}
    parameters = inspect.signature(download).parameters
    commands = []
    for path in documents():
        for text in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
            for line in text.replace("\\\n", " ").splitlines():
                if line.startswith("img2dataset "):
                    commands.append((path.name, shlex.split(line)[1:]))
    assert [name for name, _ in commands] == ["README.md", "training.md"]
    for name, words in commands:
        options = dict(zip(words[0::2], words[1::2]))
        assert all(option.startswith("--") and option[2:] in parameters for option in options), (name, options)
        assert {option[2:]: value for option, value in options.items()} == python, name
