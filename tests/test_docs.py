"""The README and docs/: every relative link resolves, the README stays short, generated pages are current."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 220
# Linked before they are written (by another change); checked like any link once they exist.
PLANNED: set[Path] = set()  # links to files that a running job writes later

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose(text: str) -> str:
    """The Markdown without fenced code blocks and code spans (links there are not links)."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file (repeated headings get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    found = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = re.match(r"#{1,6}\s+(.+?)\s*#*\s*$", line)
        if fenced or not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[str]:
    """The link and image targets of a Markdown file, outside code."""
    return LINK.findall(prose(path.read_text(encoding="utf-8")))


def test_the_link_parser_finds_links_and_skips_code(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        '# Title: one `two`\n\nSee [a](docs/a.md#x-y), ![pic](images/p.jpg "t") and [b [c]](b.md).\n'
        "`[not](code.md)`\n```\n[not](fenced.md)\n```\n## Title: one `two`\n",
        encoding="utf-8",
    )
    assert links(page) == ["docs/a.md#x-y", "images/p.jpg", "b.md"]
    assert anchors(page) == {"title-one-two", "title-one-two-1"}
    assert slug("The full comparison ([results/reproduce/results.md](../x.md))") == (
        "the-full-comparison-resultsreproduceresultsmd"
    )
    assert slug("Transfer learning and `reproduce`") == "transfer-learning-and-reproduce"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if dest in PLANNED and not dest.exists():
            continue
        if not dest.is_relative_to(ROOT) or not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_docs_pages_are_linked_from_the_readme() -> None:
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md")}
    unlinked = [p.name for p in DOCS[1:] if p not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_the_readme_is_short() -> None:
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move details to docs/ (at most {README_MAX_LINES})"


def test_the_python_api_page_is_what_its_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("gen_python_api", ROOT / "docs" / "gen_python_api.py")
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    expected = gen.render()
    assert "## Classifier" in expected and "## analyze_smear" in expected and "## Prediction" in expected
    committed = (ROOT / "docs" / "python-api.md").read_text(encoding="utf-8")
    assert committed == expected, "docs/python-api.md is out of date: run python docs/gen_python_api.py"


def test_every_error_code_in_the_docs_exists_in_the_code() -> None:
    source = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "src" / "malaria_cells").glob("*.py"))
    defined = set(re.findall(r"\"([a-z]+(?:_[a-z]+)*)\"", source))
    rows = [
        line for line in (ROOT / "docs" / "errors.md").read_text(encoding="utf-8").splitlines() if line[:3] == "| `"
    ]
    listed = {code for line in rows for code in re.findall(r"`([a-z_]+)`", line.split("|")[1])}
    assert len(listed) > 50
    assert not listed - defined, f"docs/errors.md lists codes the code never uses: {sorted(listed - defined)}"
