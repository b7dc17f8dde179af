"""The fenced blocks of the README and the docs, and the comment that says who runs each.

Every block of commands or code (`COMMAND_LANGUAGES`, and an unlabelled block whose first line looks like a command)
sits under one of two HTML comments, on the last non-blank line before its opening fence (invisible on GitHub):

    <!-- run by tests/docs/test_readme.py::test_readme_examples_run -->
    <!-- not run by the tests: REASON -->

A test that runs blocks takes them with `run_by(__file__, "test_name")`, so a block is run by exactly the test its
comment names (tests/docs/test_doc_blocks.py checks that every block has a comment and that each named test asks for its
blocks). Plain python, no third-party imports: the vLLM tests use it too, in another environment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMAND_LANGUAGES = {
    "bash", "sh", "shell", "console", "zsh", "shell-session", "powershell", "bat", "cmd", "dockerfile",
    "python", "py", "pycon", "ipython", "yaml", "yml", "toml", "ini",
}  # fmt: skip
# An unlabelled block (output, a folder tree) that starts with one of these is a command block without its language.
COMMAND_WORDS = re.compile(r"^\s*(\$ |magma-hf\b|python3?\b|pip\b|make\b|accelerate\b|vllm\b|git\b|cd\b|export\b)")
RUN_BY = re.compile(r"^<!-- run by (?P<file>tests/[\w/.-]+\.py)::(?P<test>\w+) -->$")
NOT_RUN = re.compile(r"^<!-- not run by the tests: (?P<reason>\S.*\S) -->$")
FENCE = re.compile(r"^(?P<fence>```+|~~~+)\s*(?P<info>[^`\s]*)")


@dataclass(frozen=True)
class Block:
    path: Path  # the markdown file
    line: int  # the opening fence's line, 1-based
    language: str  # the info string's first word, lower case ("" when there is none)
    text: str  # the lines between the fences
    marker: str  # the last non-blank line before the opening fence, stripped

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    @property
    def is_command_block(self) -> bool:
        if self.language:
            return self.language in COMMAND_LANGUAGES
        return bool(COMMAND_WORDS.match(self.text))

    @property
    def run_by(self) -> tuple[str, str] | None:
        """(test file relative to the repository, test function) of a `run by` comment."""
        match = RUN_BY.match(self.marker)
        return (match["file"], match["test"]) if match else None

    @property
    def not_run_reason(self) -> str | None:
        match = NOT_RUN.match(self.marker)
        return match["reason"] if match else None


def documents() -> list[Path]:
    """The README, every markdown file under docs/, and the README of each top-level folder (conversion/, ...)."""
    found = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), *sorted(REPO.glob("*/README.md"))]
    return [path for path in found if not any(part.startswith(".") for part in path.relative_to(REPO).parts)]


def blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    found, number = [], 0
    while number < len(lines):
        opening = FENCE.match(lines[number])
        if not opening:
            number += 1
            continue
        fence = opening["fence"]
        end = next((n for n in range(number + 1, len(lines)) if lines[n].strip().startswith(fence)), len(lines))
        before = next((lines[n].strip() for n in range(number - 1, -1, -1) if lines[n].strip()), "")
        text = "\n".join(lines[number + 1 : end]) + "\n"
        found.append(Block(path, number + 1, opening["info"].lower(), text, before))
        number = end + 1
    return found


def all_blocks() -> list[Block]:
    return [block for path in documents() for block in blocks(path)]


def run_by(test_file: str, test: str) -> list[Block]:
    """The blocks whose comment says `run by <test_file relative to the repository>::<test>`, in document order."""
    relative = Path(test_file).resolve().relative_to(REPO).as_posix()
    chosen = [block for block in all_blocks() if block.run_by == (relative, test)]
    assert chosen, f"no block of the README or the docs is marked <!-- run by {relative}::{test} -->"
    return chosen
