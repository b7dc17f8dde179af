"""Caption metrics against numbers from the COCO caption evaluation (see fixtures/README.md)."""

import json
from pathlib import Path

import pytest

from magma_hf.evaluation import caption_metrics
from magma_hf.evaluation.caption_metrics import CaptionMetricsUnavailable, caption_scores, check_caption_requirements

FIXTURES = Path(__file__).parent / "fixtures"


def _requirements_met() -> bool:
    try:
        check_caption_requirements()
    except CaptionMetricsUnavailable:
        return False
    return True


needs_coco_tool = pytest.mark.skipif(not _requirements_met(), reason="needs the 'eval' extra and Java")


@needs_coco_tool
def test_matches_the_coco_caption_evaluation():
    cases = json.loads((FIXTURES / "caption_cases.json").read_text())
    expected = json.loads((FIXTURES / "caption_coco_scores.json").read_text())
    # String ids, shuffled order: the result must not depend on either.
    predictions = {f"img{c['image_id']}": c["prediction"] for c in reversed(cases)}
    references = {f"img{c['image_id']}": c["references"] for c in cases}
    corpus, per_example = caption_scores(predictions, references)
    names = {"BLEU-1": "Bleu_1", "BLEU-2": "Bleu_2", "BLEU-3": "Bleu_3", "BLEU-4": "Bleu_4", "CIDEr-D": "CIDEr"}
    for ours, theirs in names.items():
        assert corpus[ours] == pytest.approx(expected["corpus"][theirs], rel=1e-9, abs=1e-12)
        for image_id, scores in expected["per_image"].items():
            assert per_example[f"img{image_id}"][ours] == pytest.approx(scores[theirs], rel=1e-9, abs=1e-12)


@needs_coco_tool
def test_mismatched_ids_are_an_error():
    with pytest.raises(ValueError, match="differ in ids"):
        caption_scores({"a": "a cat"}, {"b": ["a cat"]})


def test_missing_java_is_named(monkeypatch):
    pytest.importorskip("pycocoevalcap")
    monkeypatch.setattr(caption_metrics.shutil, "which", lambda name: None)
    with pytest.raises(CaptionMetricsUnavailable, match="Java"):
        caption_scores({"a": "a cat"}, {"a": ["a cat"]})


def test_missing_package_is_named(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)  # makes `import pycocoevalcap` fail
    with pytest.raises(CaptionMetricsUnavailable, match=r"magma-hf\[eval\]"):
        check_caption_requirements()


def test_cli_caption_task_stops_before_loading_anything(monkeypatch, capsys, tmp_path):
    from magma_hf.cli import main

    pytest.importorskip("pycocoevalcap")
    monkeypatch.setattr(caption_metrics.shutil, "which", lambda name: None)
    argv = ["eval", "--task", "caption", "--data", str(tmp_path / "none"), "--model", str(tmp_path / "none")]
    assert main(argv) == 2
    assert "Caption metrics need Java" in capsys.readouterr().err
