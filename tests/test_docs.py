"""The Markdown documents' links resolve: every ``(#anchor)`` names a heading of its own page (GitHub's
anchor rule), and every relative file link names a file of the repository."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def headings(text: str) -> list[str]:
    """The page's headings, outside code fences."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"^#{1,6} ", line):
            out.append(line.lstrip("#").strip())
    return out


def anchors(text: str) -> set[str]:
    """GitHub's anchors: lower case, punctuation but ``-`` and ``_`` dropped, spaces as ``-``; a repeated
    anchor gets ``-1``, ``-2`` ..."""
    seen: dict[str, int] = {}
    for title in headings(text):
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        if n:
            seen[f"{slug}-{n}"] = 1
    return set(seen)


def test_anchor_rule_matches_github_on_known_headings():
    text = "## Is there a backdoor? A scan\n## A: `--method auto`\n## Two\n## Two\n```\n## not a heading\n```\n"
    assert anchors(text) == {"is-there-a-backdoor-a-scan", "a---method-auto", "two", "two-1"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_of_the_page_resolves(page: Path):
    text = page.read_text()
    own = anchors(text)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):          # http:, https:, mailto: - not checked offline
            continue
        path, _, frag = target.partition("#")
        if not path:
            if frag not in own:
                broken.append(target)
        elif not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{page.name}: links to nothing: {broken}"
