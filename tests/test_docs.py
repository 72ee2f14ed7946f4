"""Every ```python block of README.md and docs/ runs: the blocks of one page in order, in one namespace,
in a temporary directory, so that the documentation cannot drift from the API. A block whose first
line is `# docs: no-test` is not run (for what needs a GPU or a cluster; use it sparingly)."""

from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path

import pytest
import torch

from pdprune import layers

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```\s*$", re.DOTALL | re.MULTILINE)
NO_TEST = "# docs: no-test"
README_LIMIT = 15_000


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, code) of every top-level ```python block of a Markdown text."""
    return [(text[: match.start(1)].count("\n") + 1, match.group(1)) for match in FENCE.finditer(text)]


def run_page(path: Path) -> int:
    """Run the page's blocks in order in one namespace; return how many ran."""
    namespace: dict = {"__name__": f"docs_{path.stem.replace('-', '_')}"}
    ran = 0
    for line, code in python_blocks(path.read_text()):
        if code.lstrip().startswith(NO_TEST):
            continue
        padded = "\n" * (line - 1) + code  # tracebacks point at the page's own line numbers
        exec(compile(padded, str(path), "exec"), namespace)  # noqa: S102 - the documentation is the code under test
        ran += 1
    return ran


@pytest.fixture
def one_thread():
    """The pages' models are tiny: one thread runs them fastest, and many times faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p.read_text())], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_block_of_the_page_runs(page, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(layers, "_REGISTERED", dict(layers._REGISTERED))  # a page's layer types end with the page
    # torch.compile as the pages call it, with the backend that skips the C++ compiler (seconds, not a
    # minute): the pages' use of the API is what is tested here; tests/test_compile.py compiles for real.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pages show warnings on purpose (layers left dense, ...)
        assert run_page(page) > 0


def test_a_broken_block_fails_with_the_page_and_line(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("# A page\n\n```python\nimport pdprune\n```\n\ntext\n\n```python\npdprune.PruningConfig(sparsity=1.5)\n```\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)") as error:
        run_page(page)
    assert any(str(entry.path) == str(page) and entry.lineno + 1 == 10 for entry in error.traceback), "the page's line 10 is named"


def test_blocks_marked_no_test_are_skipped_and_others_share_a_namespace(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```python\nx = 1\n```\n\n```python\n# docs: no-test\nraise SystemExit\n```\n\n```python\nassert x == 1\n```\n")
    assert run_page(page) == 2


def test_readme_is_a_front_page_that_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= README_LIMIT, f"README.md is {len(readme.encode()):,} bytes; move detail into docs/"
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert first_block[0].startswith("make demo") and first_block[1].startswith("make test")


def test_every_page_is_in_the_navigation():
    navigation = (ROOT / "mkdocs.yml").read_text()
    pages = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    missing = sorted(page for page in pages if page not in navigation)
    assert not missing, f"pages not in mkdocs.yml's nav: {missing}"
