"""Fixtures of the evaluation and captioning tests: one tiny MAGMA that answers, saved once per test module."""

import pytest

from magma_hf.jobs import load_model_and_processor
from tests.helpers import save_answering_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    save_answering_model(path)
    return path


@pytest.fixture(scope="module")
def model_and_processor(model_dir):
    return load_model_and_processor(model_dir, device="cpu")
