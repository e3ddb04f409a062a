"""The README is a short front page and the details live in docs/: every relative link between them (and into the
benchmarks' own READMEs) names a file that exists and, with `#anchor`, a heading that file has, as GitHub renders it."""

import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")),
         *sorted(REPO_ROOT.glob("benchmarks/**/*.md"))]  # fmt: skip
LINK = re.compile(r"\]\(([^)\s]+)\)")


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors for the headings outside code blocks: lower case, punctuation but hyphens dropped, spaces to
    hyphens."""
    anchors, in_code = set(), False
    for line in markdown.split("\n"):
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower())
            anchors.add(title.replace(" ", "-"))
    return anchors


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path) if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked.read_text()):
            broken.append(f"{target}: no such heading")
    return broken


def test_heading_anchors_are_githubs():
    text = "# Title\n## Against llama.cpp on the CPU (same weights, one run)\n```bash\n# no heading\n```\n"
    text += "## `mla-dsa serve`"
    assert heading_anchors(text) == {"title", "against-llamacpp-on-the-cpu-same-weights-one-run", "mla-dsa-serve"}


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "other.md").write_text("## Present\n")
    page = tmp_path / "page.md"
    page.write_text("[a](other.md#present) [b](other.md#absent) [c](missing.md) [d](https://example.com/x)")
    assert broken_links(page) == ["other.md#absent: no such heading", "missing.md: no such file"]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO_ROOT)))
def test_every_relative_link_of_the_docs_resolves(page):
    assert broken_links(page) == []


def test_the_readme_front_page_stays_short_and_links_every_docs_page():
    """Install, use, convert, train, serve on the front page; the long tables in docs/, each reachable from it."""
    readme = (REPO_ROOT / "README.md").read_text()
    assert readme.count("\n") <= 200
    for heading in ("## Using it", "## Converting", "## Training the indexer", "## Serving", "## Limitations"):
        assert f"\n{heading}\n" in readme, heading
    linked = {Path(target.partition("#")[0]).name for target in LINK.findall(readme) if target.startswith("docs/")}
    documents = {page.name for page in (REPO_ROOT / "docs").glob("*.md")}
    reachable = linked | {name for page in linked for name in documents
                          if name in (REPO_ROOT / "docs" / page).read_text()}  # fmt: skip
    assert documents <= reachable, documents - reachable
