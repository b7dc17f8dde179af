"""Caption metrics as the COCO caption evaluation computes them: BLEU-1..4 and CIDEr-D, through `pycocoevalcap`.

Nothing is re-implemented: captions go through the COCO tool's PTB tokenizer (Stanford CoreNLP 3.4.1, run with
Java; it lower-cases and drops punctuation), then its `Bleu(4)` (corpus BLEU, "closest" reference length) and
`Cider()` scorers. The latter is CIDEr-D (Gaussian length penalty with sigma 6, clipped n-gram counts, times 10),
which COCO reports under the name "CIDEr". Its IDF comes from the references of the evaluated images, so scores on a
subset differ from scores on the full split. Values are on the COCO tool's scale (papers often multiply by 100).

Needs the `eval` extra (`pip install "magma-hf[eval]"`) and a Java runtime (`java` on PATH, e.g. Debian's
`default-jre-headless`); `check_caption_requirements()` says which is missing.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
from collections.abc import Mapping, Sequence


class CaptionMetricsUnavailable(RuntimeError):
    """The COCO caption tool cannot run here (a missing package or Java)."""


def check_caption_requirements() -> None:
    """Raise `CaptionMetricsUnavailable` naming what is missing for the caption metrics."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError as error:
        raise CaptionMetricsUnavailable(
            "Caption metrics need the COCO caption evaluation package: pip install 'magma-hf[eval]' "
            f"(or pip install pycocoevalcap). Import failed: {error}"
        ) from error
    java = shutil.which("java")
    if java is None:
        raise CaptionMetricsUnavailable(
            "Caption metrics need Java: the COCO caption tool tokenizes with Stanford CoreNLP's PTBTokenizer, a Java "
            "program. Install a Java runtime (e.g. `apt-get install default-jre-headless`) so that `java` is on PATH."
        )
    probe = subprocess.run([java, "-version"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise CaptionMetricsUnavailable(f"`{java} -version` failed ({probe.returncode}): {probe.stderr.strip()}")


def _as_reference_lists(references: Mapping[str, str | Sequence[str]]) -> dict[str, list[str]]:
    out = {}
    for key, captions in references.items():
        captions = [captions] if isinstance(captions, str) else list(captions)
        if not captions:
            raise ValueError(f"Example {key!r} has no reference caption")
        out[key] = captions
    return out


def caption_scores(
    predictions: Mapping[str, str], references: Mapping[str, str | Sequence[str]]
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Corpus BLEU-1..4 and CIDEr-D of generated captions, and the per-example values.

    Args:
        predictions: `{example_id: generated caption}`.
        references: `{example_id: reference caption(s)}`, the same ids.

    Returns:
        `({"BLEU-1": .., "BLEU-2": .., "BLEU-3": .., "BLEU-4": .., "CIDEr-D": ..}, {example_id: {same keys}})`.
        Per-example BLEU is the sentence-level BLEU the COCO tool reports beside the corpus value.
    """
    check_caption_requirements()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    references = _as_reference_lists(references)
    if set(predictions) != set(references):
        missing = sorted(set(references) - set(predictions))[:5]
        extra = sorted(set(predictions) - set(references))[:5]
        raise ValueError(f"Predictions and references differ in ids (missing: {missing}, unknown: {extra})")
    if not predictions:
        raise ValueError("No captions to score")
    # The COCO tool keys by id and expects dicts with "caption"; keep our ids as strings in one fixed order.
    ids = sorted(predictions, key=str)
    tokenizer = PTBTokenizer()
    try:
        gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
        res = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in ids})
    except PermissionError as error:
        raise CaptionMetricsUnavailable(
            f"The COCO PTB tokenizer writes a temporary file beside its jar and cannot here ({error}); install "
            "pycocoevalcap where this user can write (e.g. a virtual environment)."
        ) from error
    res = {i: res.get(i, [""]) for i in ids}  # the tokenizer drops nothing, but keep every id even if it did
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its internal counts
        bleu, bleu_per_example = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_per_example = Cider().compute_score(gts, res)
    corpus = {f"BLEU-{n + 1}": float(bleu[n]) for n in range(4)}
    corpus["CIDEr-D"] = float(cider)
    per_example = {}
    for k, i in enumerate(gts):  # the scorers' order is the references' key order
        per_example[i] = {f"BLEU-{n + 1}": float(bleu_per_example[n][k]) for n in range(4)}
        per_example[i]["CIDEr-D"] = float(cider_per_example[k])
    return corpus, per_example


__all__ = ["CaptionMetricsUnavailable", "caption_scores", "check_caption_requirements"]
