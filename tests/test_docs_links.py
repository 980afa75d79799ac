"""README.md and docs/*.md: every relative link resolves, nothing points outside the repository,
and the README's result tables are the ones the docs record."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
LOOPBACK = {"127.0.0.1", "localhost", "0.0.0.0"}

LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
AUTOLINK = re.compile(r"<((?:https?|ftp)://[^>\s]+)>")
URL = re.compile(r"\b(?:https?|ftp)://[^\s)\]`'\"<>]+")


def prose(text: str) -> str:
    """The Markdown outside fenced code blocks (a ``# comment`` there is no heading, a path no link)."""
    kept, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            kept.append(line)
    return "\n".join(kept)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for line in prose(page.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            name, k = base, 0
            while name in found:
                k += 1
                name = f"{base}-{k}"
            found.add(name)
    return found


def links(page: Path) -> list[str]:
    return LINK.findall(prose(page.read_text()))


def test_the_pages_exist_and_link_each_other():
    assert {p.name for p in PAGES} >= {"README.md", "results.md", "benchmarks.md", "mechanisms.md"}
    readme_targets = {urlsplit(target).path for target in links(README)}
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme_targets, f"README.md does not link docs/{page.name}"


def test_every_relative_link_points_at_an_existing_file_and_heading():
    problems = []
    for page in PAGES:
        for target in links(page):
            parts = urlsplit(target)
            if parts.scheme or parts.netloc:
                continue  # checked below: the README has none
            path = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            where = f"{page.relative_to(REPO)}: ({target})"
            if REPO not in path.parents and path != REPO:
                problems.append(f"{where} leaves the repository")
            elif not path.exists():
                problems.append(f"{where} names a missing file")
            elif parts.fragment and path.suffix == ".md" and parts.fragment not in anchors(path):
                problems.append(f"{where} names a missing heading")
    assert problems == []


def test_nothing_in_the_readme_points_outside_the_repository():
    text = README.read_text()
    outside = [url for url in URL.findall(text) if urlsplit(url).hostname not in LOOPBACK]
    linked = [t for t in links(README) if urlsplit(t).scheme] + AUTOLINK.findall(text)
    assert outside == [] and linked == []
    assert "../shared" not in text  # a fresh clone has no ../shared


def test_the_readme_result_tables_are_the_ones_the_docs_record():
    # The README shows the main tables; docs/ holds the complete record. A figure edited in one
    # place only would make the two disagree.
    results = prose(README.read_text()).split("\n## Results\n", 1)[1]
    docs = "\n".join(page.read_text() for page in PAGES[1:])
    rows = [line for line in results.splitlines() if line.startswith("|") and re.search(r"\d", line)]
    assert len(rows) >= 30
    assert [row for row in rows if row not in docs] == []
