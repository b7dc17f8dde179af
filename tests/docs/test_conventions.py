"""The package's conventions, checked on its source: module size, public names across modules, one logger, one
refusal convention, one section-banner style, Hub-exported modules as flat siblings."""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "magma_hf"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES = 800
BANNER_RULE = "# " + "-" * 117


def relative(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def test_the_package_is_found():
    assert len(MODULES) > 40 and PACKAGE / "modeling_magma.py" in MODULES


def test_no_module_is_over_800_lines():
    sizes = {relative(path): len(path.read_text().splitlines()) for path in MODULES}
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def private_imports(path: Path) -> list[str]:
    """`from <this package> import _name`: a private name taken from another module of the package."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("magma_hf")):
            found += [
                f"{relative(path)}:{node.lineno} {alias.name}"
                for alias in node.names
                if alias.name.startswith("_") and not alias.name.startswith("__")
            ]
    return found


def test_no_module_imports_a_private_name_of_another():
    assert [line for path in MODULES for line in private_imports(path)] == []


def test_one_logger_and_one_way_to_refuse_an_input():
    """transformers' `logging.get_logger(__name__)`, and a refused input reported by `cli.refuse` alone."""
    std_loggers = [relative(p) for p in MODULES if re.search(r"\blogging\.getLogger\(__name__\)", p.read_text())]
    prints_errors = re.compile(r"print\(f?[\"']error:")
    own_errors = [relative(p) for p in MODULES if p.name != "cli.py" and prints_errors.search(p.read_text())]
    assert (std_loggers, own_errors) == ([], [])


def test_one_section_banner_style():
    """A banner is a full-width rule line followed by its title: no boxed, right-aligned or one-line variants."""
    odd = []
    for path in MODULES:
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            if re.fullmatch(r"\s*# ?-{8,}.*|\s*# .*-{8,}", line):
                following = lines[number + 1] if number + 1 < len(lines) else ""
                if line != BANNER_RULE or not following.startswith("# ") or re.search(r"-{8,}", following):
                    odd.append(f"{relative(path)}:{number + 1}")
    assert odd == []


@pytest.mark.parametrize("module", sorted(PACKAGE.glob("*_magma.py")), ids=lambda path: path.name)
def test_hub_exported_modules_import_only_their_siblings(module):
    """A Hub folder gets the `*_magma.py` files flat, beside each other: they may import each other, nothing else of
    the package."""
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.level == 1 and (node.module or "").endswith("_magma"), f"{module.name}:{node.lineno}"
        if isinstance(node, ast.ImportFrom) and not node.level:
            assert not (node.module or "").startswith("magma_hf"), f"{module.name}:{node.lineno}"


def test_the_architecture_page_names_every_module():
    """docs/architecture.md is where the next engineer learns what each module owns: a new module is named there."""
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    modules = [path for path in MODULES if path.name not in ("__init__.py", "__main__.py")]
    assert [relative(path) for path in modules if path.name not in page] == []
