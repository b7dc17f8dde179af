"""Evaluate the demo's model (`make demo`) with the evaluation harness: captions and questions, zero- and few-shot.

    make demo                                      # or: magma-hf demo --output-dir demo-output
    python -m tests.benchmarks.eval_demo demo-output

Captioning: the held-out digits (`demo-output/data/test`) scored with BLEU-4 and CIDEr-D (COCO caption tool; needs
the `eval` extra and Java). Question answering: the demo's two transfer questions ("Is this number odd?", "Which
number comes after it?") about the same held-out images, as GQA-style data (one answer, exact match after VQA
normalisation), written in the original layout with `convert_dataset`. Few-shot examples come from the training
images (`demo-output/data/train`), so in K-shot runs the model has seen K answered questions in its prompt.
"""

import argparse
import json
import tempfile
from pathlib import Path

from magma_hf.data import convert_dataset
from magma_hf.demo import QUESTIONS
from magma_hf.evaluation.run import evaluate


def question_dataset(source: Path, target: Path, question_name: str) -> Path:
    """The demo's images of `source` (original layout) with one question each, in the original layout at `target`."""
    question = QUESTIONS[question_name]
    text = question.prompt.removeprefix("Q: ").removesuffix(" A:")

    def samples():
        for number, json_path in enumerate(sorted((source / "image_data").rglob("*.json"))):
            sample = json.loads(json_path.read_text())
            answer = question.answer(sample["metadata"]["digit"])
            metadata = {"question": text, "answers": [answer], "question_id": number, "image_id": number}
            yield source / sample["image_path"], {"captions": [f"{question.prompt} {answer}"], "metadata": metadata}

    convert_dataset(target, samples(), mode="cp")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo_output", type=Path, help="the demo's --output-dir")
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    model, data = args.demo_output / "magma", args.demo_output / "data"
    rows = []
    for shots in args.shots:
        scores = evaluate(
            "caption",
            str(model),
            dataset=str(data / "test"),
            support=str(data / "train"),
            shots=shots,
            batch_size=args.batch_size,
        )
        metrics = scores["metrics"]
        rows.append(
            (
                f"caption, {shots}-shot",
                f"BLEU-1 {metrics['BLEU-1']:.3f}, BLEU-4 {metrics['BLEU-4']:.3f}, CIDEr-D {metrics['CIDEr-D']:.3f}",
            )
        )
    with tempfile.TemporaryDirectory() as scratch:
        for name in QUESTIONS:
            test = question_dataset(data / "test", Path(scratch) / f"{name}-test", name)
            support = question_dataset(data / "train", Path(scratch) / f"{name}-train", name)
            for shots in args.shots:
                scores = evaluate(
                    "gqa", str(model), dataset=str(test), support=str(support), shots=shots, batch_size=args.batch_size
                )
                rows.append(
                    (f"'{QUESTIONS[name].prompt}', {shots}-shot", f"accuracy {scores['metrics']['accuracy']:.1f} %")
                )
    width = max(len(label) for label, _ in rows)
    print("\n".join(f"{label:<{width}}  {value}" for label, value in rows))


if __name__ == "__main__":
    main()
