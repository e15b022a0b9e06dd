"""Every cross-reference points at something that exists: Markdown links between README.md and docs/
(file and heading), `docs/<page>.md#<anchor>` references in code, params.yaml, dvc.yaml, the Makefile and
bench/, and the older `README, "Heading"` style, which must name a README heading."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("**/*.md"))]
CODE = [*sorted((REPO / "src" / "ftq").rglob("*.py")), *sorted((REPO / "bench").glob("*.py")),
        REPO / "params.yaml", REPO / "dvc.yaml", REPO / "Makefile"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
DOC_REFERENCE = re.compile(r"\b((?:docs/[\w-]+|README)\.md)(?:#([\w-]+))?")
README_HEADING_REFERENCE = re.compile(r"\bREADME(?:\.md)?\s*[,:]\s*(?:[\"'“]([^\"'”\n]+)[\"'”]|([A-Z][\w'’ .-]*[\w'’]))")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores kept),
    spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(page: Path) -> list[str]:
    found, fenced = [], False
    for line in page.read_text().split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6} (.+)", line)):
            found.append(match[1].strip())
    return found


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in headings(page):
        base = slug(heading)
        count = seen.get(base, 0)
        out.add(base if count == 0 else f"{base}-{count}")  # GitHub numbers repeated headings
        seen[base] = count + 1
    return out


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(re.sub(r"```.*?```", "", page.read_text(), flags=re.S)):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not ours to check offline
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked.relative_to(REPO) if linked.is_relative_to(REPO) else linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading with anchor #{anchor} in {linked.relative_to(REPO)}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_in_the_docs_reaches_a_file_and_heading(page):
    assert broken_links(page) == []


def broken_references(source: Path) -> list[str]:
    text, broken = source.read_text(), []
    for page, anchor in DOC_REFERENCE.findall(text):
        target = REPO / page
        if page == "README.md" and not anchor:
            continue  # the file itself (merge writes a model card named README.md, for one)
        if not target.exists():
            broken.append(f"{page}: no such page")
        elif anchor and anchor not in anchors(target):
            broken.append(f"{page}#{anchor}: no such heading")
    readme = [h.lower() for h in headings(REPO / "README.md")]
    for quoted, bare in README_HEADING_REFERENCE.findall(text):
        name = quoted or bare
        if not any(h.startswith(name.lower()) for h in readme):
            broken.append(f"README, {name!r}: no such README heading (point at docs/<page>.md#<anchor>)")
    return broken


@pytest.mark.parametrize("source", CODE, ids=lambda p: str(p.relative_to(REPO)))
def test_every_reference_in_code_and_settings_reaches_a_heading(source):
    assert broken_references(source) == []


def test_the_checks_find_a_broken_link_and_reference(tmp_path):
    page = REPO / "docs" / "x.md"
    assert slug("Stage `promote`: the registry's champion") == "stage-promote-the-registrys-champion"
    assert "promote" not in anchors(REPO / "README.md")
    fake = tmp_path / "fake.py"
    fake.write_text('# see docs/pipeline.md#no-such-heading, and README, "The quantize check"\n')
    assert len(broken_references(fake)) == 2
    md = REPO / "docs" / "_probe_links.md"
    md.write_text("[a](pipeline.md#no-such-heading) [b](missing.md)\n")
    try:
        assert len(broken_links(md)) == 2
    finally:
        md.unlink()
    assert not page.exists()
