"""Every command or code block of the README and the docs is run by a named test as written, or says why not
(`doc_blocks.py` describes the comments); the `magma-hf` command lines of every block parse with the command's own
parser, whether or not the block runs here."""

import ast
import importlib
import shlex
from pathlib import Path

import pytest

from magma_hf.cli import SUBCOMMANDS
from tests.doc_blocks import REPO, all_blocks, blocks, documents

HOW_TO_MARK = (
    "Put one of these comments on the line before the opening fence:\n"
    "  <!-- run by tests/PATH.py::TEST_NAME -->   where that test takes the block with "
    'doc_blocks.run_by(__file__, "TEST_NAME") and runs it as written (substituting only placeholders such as the '
    "model folder)\n"
    "  <!-- not run by the tests: REASON -->      saying why it cannot run here (a GPU, the released checkpoint, a "
    "data set that is not shipped, ...)"
)


def test_the_documents_are_found_and_have_command_blocks():
    names = {path.relative_to(REPO).as_posix() for path in documents()}
    assert {"README.md", "docs/training.md", "docs/evaluation.md", "conversion/README.md"} <= names
    assert sum(block.is_command_block for block in all_blocks()) >= 30


def test_every_command_block_is_run_by_a_test_or_says_why_not():
    unmarked = [
        f"{block.where} (```{block.language}): {block.text.splitlines()[0] if block.text.strip() else ''}"
        for block in all_blocks()
        if block.is_command_block and block.run_by is None and block.not_run_reason is None
    ]
    assert not unmarked, (
        "command blocks that no test runs and that say nothing about it:\n  "
        + "\n  ".join(unmarked)
        + "\n"
        + HOW_TO_MARK
    )


def _tests_asking_for_their_blocks(source: str) -> set[str]:
    """The test names given to `run_by(__file__, "NAME")` (or `doc_blocks.run_by`) in a test file."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "run_by":
            names.update(arg.value for arg in node.args[1:2] if isinstance(arg, ast.Constant))
    return names


def test_each_named_test_exists_and_takes_its_blocks():
    problems = []
    for block in all_blocks():
        if block.run_by is None:
            continue
        test_file, test = block.run_by
        path = REPO / test_file
        if not path.exists():
            problems.append(f"{block.where}: {test_file} does not exist")
            continue
        source = path.read_text()
        defined = {node.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.FunctionDef)}
        if test not in defined:
            problems.append(f"{block.where}: {test_file} has no test {test}")
        elif test not in _tests_asking_for_their_blocks(source):
            problems.append(f'{block.where}: {test_file} never calls run_by(__file__, "{test}")')
    assert not problems, "\n".join(problems) + "\n" + HOW_TO_MARK


def test_the_marker_check_reports_an_unmarked_block(tmp_path):
    """A block added later without a comment is reported; a comment above a blank line still counts."""
    document = tmp_path / "doc.md"
    document.write_text(
        "Text.\n\n```bash\nmagma-hf train x.yml\n```\n\n<!-- not run by the tests: needs a GPU -->\n\n```sh\nls\n```\n"
        "\n```\noutput, not a command\n```\n\n```\nmagma-hf eval --help\n```\n"
    )
    found = blocks(document)
    assert [(block.line, block.is_command_block, block.not_run_reason) for block in found] == [
        (3, True, None), (9, True, "needs a GPU"), (13, False, None), (17, True, None),
    ]  # fmt: skip


def command_lines(text: str) -> list[str]:
    """The command lines of a shell block: comments dropped, continuation lines joined."""
    lines, current = [], ""
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip():
            lines.append(current.strip())
        current = ""
    return lines


def magma_hf_arguments(line: str) -> list[str] | None:
    """The arguments after `magma-hf`, `python -m magma_hf` (`accelerate launch ... -m magma_hf`) or the converter's
    `python -m magma_hf.conversion`; None for other commands."""
    words = shlex.split(line)
    if words[:1] == ["magma-hf"]:
        return words[1:]
    for start in range(len(words) - 1):
        if words[start : start + 2] == ["-m", "magma_hf"]:
            return words[start + 2 :]
        if words[start : start + 2] == ["-m", "magma_hf.conversion"]:
            return ["convert", *words[start + 2 :]]
    return None


DOCUMENTED = [
    pytest.param(arguments, id=f"{block.where}:{' '.join(arguments[:1])}")
    for block in all_blocks()
    if block.language in {"bash", "sh", "shell", "console"}
    for arguments in map(magma_hf_arguments, command_lines(block.text))
    if arguments is not None
]


def test_documented_commands_are_found():
    assert len(DOCUMENTED) >= 20


@pytest.mark.parametrize("arguments", DOCUMENTED)
def test_documented_magma_hf_commands_parse(arguments, monkeypatch):
    """Each option a document gives exists and takes what it is given (the command's own parser; nothing runs)."""
    import argparse

    command, *rest = arguments
    assert command in SUBCOMMANDS, f"magma-hf has no command {command!r}"
    parser = argparse.ArgumentParser(prog=f"magma-hf {command}", exit_on_error=False)
    importlib.import_module(SUBCOMMANDS[command][0]).add_arguments(parser)
    monkeypatch.chdir(Path(REPO))
    try:
        parser.parse_args(rest)
    except (argparse.ArgumentError, SystemExit) as error:
        pytest.fail(f"magma-hf {' '.join(arguments)}: {error}")
