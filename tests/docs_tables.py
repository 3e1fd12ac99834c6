"""The tables in docs/ that are made from the code, so that they cannot drift from it. Each sits
between two markers in its page:

    <!-- generated: NAME -->
    ...
    <!-- end generated -->

    python tests/docs_tables.py            # name the tables that differ from the code (exit status 1)
    python tests/docs_tables.py --write    # rewrite them in place

The module tables come from the first sentence of each module's docstring, the stream table from
vae_dist/rng.py's `Stream` and its trailing comments, the model kinds and likelihoods from
vae_dist/kinds.py. Everything is read from the source when called (no torch). tests/test_docs.py
checks that every table equals what this module makes now.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BLOCK = re.compile(r"(<!-- generated: (?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


def cell(text: str) -> str:
    """`text` as one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def first_sentence(docstring: str | None) -> str:
    """The first sentence of a docstring's first paragraph; a colon that introduces an example
    is left off."""
    if not docstring:
        return "(no module docstring)"
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    sentence = re.split(r"(?<=[.!?])\s+(?=[A-Z`(])", paragraph, maxsplit=1)[0]
    return sentence.rstrip(":")


def module_table(package: str) -> str:
    """Every module of `package` (its sub-packages included), in path order, with the first sentence
    of its docstring; a package's __init__.py comes before its modules."""

    def order(path: Path) -> tuple:
        parts = path.relative_to(ROOT).parts
        return (*parts[:-1], "" if parts[-1] == "__init__.py" else parts[-1])

    rows = []
    for path in sorted((ROOT / package).rglob("*.py"), key=order):
        doc = ast.get_docstring(ast.parse(path.read_text(), str(path)))
        rows.append((f"`{path.relative_to(ROOT).as_posix()}`", first_sentence(doc)))
    return table(("module", "what it holds"), rows)


def stream_table() -> str:
    """vae_dist.rng.Stream: each member, its number and the comment after it."""
    path = ROOT / "vae_dist" / "rng.py"
    source = path.read_text()
    lines = source.splitlines()
    (stream,) = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "Stream"]
    rows = []
    for node in stream.body:
        if isinstance(node, ast.Assign):
            line = lines[node.lineno - 1]
            comment = line.split("#", 1)[1].strip() if "#" in line else ""
            rows.append((f"`{node.targets[0].id}`", str(ast.literal_eval(node.value)), comment))
    return table(("stream", "number", "used for"), rows)


def kinds_table() -> str:
    """vae_dist.kinds.MODEL_KINDS, as the configuration, the tests and the export read it."""
    from vae_dist.kinds import MODEL_KINDS

    rows = [
        (f"`{k.name}`", k.description, f"`configs/{k.config}.yaml`", "yes" if k.exported else "not yet",
         "yes" if k.static_int8 else "no")
        for k in MODEL_KINDS.values()
    ]
    return table(("`model.kind`", "what it is", "shipped config", "exported", "int8-static variant"), rows)


def likelihoods_table() -> str:
    from vae_dist.kinds import LIKELIHOODS

    rows = [(f"`{x.name}`", x.description, "yes" if x.exported else "not yet") for x in LIKELIHOODS.values()]
    return table(("`loss.likelihood`", "what it is", "exported"), rows)


TABLES: dict[str, Callable[[], str]] = {
    "training-modules": lambda: module_table("vae_dist"),
    "export-modules": lambda: module_table("export"),
    "random-streams": stream_table,
    "model-kinds": kinds_table,
    "likelihoods": likelihoods_table,
}


def pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def blocks(text: str) -> list[tuple[str, str]]:
    """(name, body) of each generated table in a page's text."""
    return [(m["name"], m["body"]) for m in BLOCK.finditer(text)]


def render(name: str) -> str:
    """A block's body as it should be: the table between two blank lines."""
    return "\n" + TABLES[name]() + "\n"


def rewritten(text: str) -> str:
    return BLOCK.sub(lambda m: m[1] + render(m["name"]) + m[4], text)


def main(argv: list[str]) -> int:
    write = argv == ["--write"]
    if argv and not write:
        print(__doc__, file=sys.stderr)
        return 2
    differ = []
    for page in pages():
        text = page.read_text()
        new = rewritten(text)
        if new != text:
            differ.append(page.relative_to(ROOT).as_posix())
            if write:
                page.write_text(new)
    for name in differ:
        print(f"{'rewrote' if write else 'differs from the code'}: {name}")
    return 1 if differ and not write else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # vae_dist.kinds, from a checkout that is not installed
    sys.exit(main(sys.argv[1:]))
