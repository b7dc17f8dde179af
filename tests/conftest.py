import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations, which would ask PyPI

import pytest  # noqa: E402
import torch  # noqa: E402

from magma_hf import MagmaForConditionalGeneration  # noqa: E402
from tests.doc_blocks import run_by  # noqa: E402
from tests.helpers import make_processor, make_tokenizer, run_img2dataset, tiny_config  # noqa: E402


def pytest_collection_modifyitems(items):
    """The tests that take `img2dataset_output` are slow: the fixture runs img2dataset (about a minute)."""
    for item in items:
        if "img2dataset_output" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def processor(tokenizer):
    return make_processor(tokenizer)


@pytest.fixture
def config(tokenizer):
    return tiny_config(tokenizer)


@pytest.fixture
def model(config):
    torch.manual_seed(0)
    return MagmaForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run far faster single-threaded on a shared 2-core machine (`pytestmark = usefixtures(...)`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def img2dataset_output(tmp_path_factory):
    """img2dataset's own `webdataset` and `parquet` output of 28 urls served on 127.0.0.1, 6 of them broken, 8 per
    shard, written by docs/training.md's img2dataset example (see helpers.run_img2dataset). Run once per session
    (about a minute: img2dataset starts its processes by spawn); the tests read it, never write into it."""
    (example,) = run_by(__file__, "img2dataset_output")
    return run_img2dataset(tmp_path_factory.mktemp("img2dataset"), example.text)
