"""`magma-hf` command line (also `python -m magma_hf`, so `accelerate launch -m magma_hf ...` works).

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; modules are
imported only when their command runs, so `magma-hf --help` stays fast.

One convention for a refused input, in every command: one line `error: ...` on stderr and exit status
`EXIT_REFUSED` (2, as argparse exits for a bad command line), written by `refuse`.
"""

import argparse
import importlib
import sys

EXIT_REFUSED = 2  # the input (arguments, config, data, folders) was refused; nothing was done, or what was is kept


def refuse(error: object) -> int:
    """Report a refused input the one way every command does: one line on stderr; returns `EXIT_REFUSED`."""
    print(f"error: {error}", file=sys.stderr)
    return EXIT_REFUSED


# command -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "magma_hf.training.run",
        "Train or finetune MAGMA from a YAML config (original MAGMA keys; Trainer/Accelerate/DeepSpeed)",
    ),
    "eval": ("magma_hf.evaluation.run", "Evaluate a MAGMA model on VQA, OK-VQA, GQA or captioning, zero- or few-shot"),
    "caption": (
        "magma_hf.captioning",
        "Caption (or answer one prompt for) a folder or dataset of images into JSONL; resumable, sharded",
    ),
    "convert": ("magma_hf.conversion.magma_checkpoint", "Convert the original MAGMA checkpoint into a model folder"),
    "app": ("magma_hf.app", "Try a MAGMA model folder in the browser (Gradio), or make it a Hugging Face Space"),
    "demo": (
        "magma_hf.demo",
        "Train a small MAGMA on scikit-learn's handwritten digits on the CPU, then caption with it",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="magma-hf", description="MAGMA on Hugging Face transformers")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command, (module_name, help_text) in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(command, help=help_text, description=help_text)
        subparser.set_defaults(module_name=module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    known, _ = parser.parse_known_args(argv[:1])
    if known.command is None:
        parser.print_help()
        return EXIT_REFUSED
    module = importlib.import_module(SUBCOMMANDS[known.command][0])
    subparser = argparse.ArgumentParser(prog=f"magma-hf {known.command}", description=SUBCOMMANDS[known.command][1])
    module.add_arguments(subparser)
    return module.run(subparser.parse_args(argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
