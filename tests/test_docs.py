"""The docs against the code: the generated tables are what tests/docs_tables.py makes now, every
test that README.md and docs/*.md cite exists, and every relative link leads to a file and heading
that exist. Nothing is trained or imported beyond vae_dist.kinds."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import docs_tables
import pytest

ROOT = docs_tables.ROOT
PAGES = [ROOT / "README.md", *docs_tables.pages()]
FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.M | re.S)
CITED = re.compile(r"tests/(test_\w+\.py)(?:::(\w+)(?:::(\w+))?)?")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|<img [^>]*src=\"([^\"]+)\"")


def prose(page: Path) -> str:
    """The page without its fenced code blocks: commands and outputs are not links or headings."""
    return FENCE.sub("", page.read_text())


def anchors(page: Path) -> set[str]:
    """GitHub's ids for the page's headings: lower case, punctuation dropped, spaces to hyphens,
    a repeated id numbered."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", prose(page), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
    return {slug if n == 0 else f"{slug}-{n}" for slug, count in seen.items() for n in range(count + 1)}


def defined_tests(path: Path) -> set[str]:
    """`test_x` and `TestY::test_x` for every test function of a test file."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            names |= {f"{node.name}::{f.name}" for f in node.body if isinstance(f, ast.FunctionDef)}
    return names


@pytest.mark.parametrize("name", sorted(docs_tables.TABLES))
def test_each_generated_table_is_in_the_docs_and_matches_the_code(name):
    pages = docs_tables.pages()
    found = [(page, body) for page in pages for n, body in docs_tables.blocks(page.read_text()) if n == name]
    assert found, f"no <!-- generated: {name} --> block in docs/*.md"
    for page, body in found:
        assert body == docs_tables.render(name), (
            f"{page.relative_to(ROOT)}: the {name} table differs from the code; run "
            "`.venv/bin/python tests/docs_tables.py --write`"
        )


def test_every_generated_block_names_a_table_the_generator_makes():
    names = {n for page in docs_tables.pages() for n, _ in docs_tables.blocks(page.read_text())}
    assert names <= set(docs_tables.TABLES)
    for page in docs_tables.pages():  # a marker without its end, or the other way round
        text = page.read_text()
        assert text.count("<!-- generated: ") == text.count("<!-- end generated -->"), page.name


def test_every_cited_test_exists():
    missing = []
    for page in PAGES:
        for file, name, method in CITED.findall(page.read_text()):
            path = ROOT / "tests" / file
            cited = f"tests/{file}" + (f"::{name}" if name else "") + (f"::{method}" if method else "")
            if not path.is_file():
                missing.append(f"{page.name}: {cited} (no such file)")
            elif name and (f"{name}::{method}" if method else name) not in defined_tests(path):
                missing.append(f"{page.name}: {cited}")
    assert not missing, "cited but not found:\n" + "\n".join(missing)


def test_every_relative_link_leads_to_a_file_and_heading_that_exist():
    broken = []
    for page in PAGES:
        for groups in LINK.findall(prose(page)):
            target = groups[0] or groups[1]
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_checks_see_what_they_check():
    """The link, citation and heading patterns find what the pages hold, so an empty result above
    means nothing is broken, not that nothing was looked at."""
    readme = prose(ROOT / "README.md")
    assert "quickstart" in anchors(ROOT / "README.md")
    assert "in-the-browser-make-bench-web" in anchors(ROOT / "docs" / "benchmarks.md")
    assert any("docs/guarantees.md" in (a or b) for a, b in LINK.findall(readme))
    assert len(CITED.findall((ROOT / "docs" / "guarantees.md").read_text())) > 20
