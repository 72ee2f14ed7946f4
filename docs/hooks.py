"""MkDocs hooks for pdprune's site (`make docs` builds it with --strict: every warning here fails it).

- Plots come from `benchmarks/results/` as they are: each PNG there is added to the site under
  `results/` (no copy in docs/), so a rerun of a benchmark updates the page.
- Every public name is documented: each name in the `__all__` of a module of the API reference
  (and every public function, method and property of an exported class) needs a docstring, and
  must appear on an API page.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.plugins.pdprune")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
API_DIRECTIVE = re.compile(r"^::: ([\w.]+)", re.MULTILINE)


def on_files(files, config):
    """Serve benchmarks/results/**/*.png at results/... without copying them into docs/."""
    for path in sorted(RESULTS.rglob("*.png")):
        files.append(File.generated(config, f"results/{path.relative_to(RESULTS).as_posix()}", abs_src_path=str(path)))
    return files


def _public_modules() -> list[str]:
    """Modules rendered by a `::: module` directive on an API page."""
    found = []
    for page in sorted((ROOT / "docs" / "api").glob("*.md")):
        found += [name for name in API_DIRECTIVE.findall(page.read_text()) if name.count(".") <= 2 and _is_module(name)]
    return list(dict.fromkeys(found))


def _is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return (ROOT / "src" / relative.with_suffix(".py")).is_file() or (ROOT / "src" / relative / "__init__.py").is_file()


def _undocumented(module_name: str, loader) -> tuple[list[str], list[str]]:
    """(exported names, names without a docstring) of one module."""
    module = loader.load(module_name)
    exports = [name if isinstance(name, str) else name.name for name in (module.exports or [])]
    missing = []
    for name in exports:
        if name.startswith("__"):
            continue
        target = module[name]
        target = target.final_target if target.is_alias else target
        if target.is_attribute:
            if target.docstring is None and not name.isupper():
                missing.append(f"{module_name}.{name}")
            continue
        if not target.docstring:
            missing.append(f"{module_name}.{name}")
        if target.is_class:
            for member_name, member in target.members.items():
                if member_name.startswith("_") or member.is_alias or (member.is_attribute and "property" not in member.labels):
                    continue
                if not member.docstring:
                    missing.append(f"{module_name}.{name}.{member_name}")
    return exports, missing


def on_post_build(config):
    """Every exported name has a docstring and an anchor on the API pages."""
    import griffe

    loader = griffe.GriffeLoader(search_paths=[str(ROOT / "src")], docstring_parser="google")
    anchors: set[str] = set()
    for page in (Path(config["site_dir"]) / "api").rglob("*.html"):
        anchors |= set(re.findall(r'id="([\w.]+)"', page.read_text(encoding="utf-8")))
    for module_name in _public_modules():
        exports, missing = _undocumented(module_name, loader)
        for name in missing:
            log.warning(f"public name {name} has no docstring: the API reference would show it bare; write one")
        for name in exports:
            if not name.startswith("__") and f"{module_name}.{name}" not in anchors:
                log.warning(f"{module_name}.{name} is in {module_name}.__all__ but on no API page (docs/api/)")
