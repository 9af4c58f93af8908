"""The docs name files that exist, link pages that exist, and cite nothing outside the repo.

Code moves (``app/`` became ``hessian_service/``); a page that still names the old path
sends a reader nowhere. So every repository path a page under ``docs/`` names in
backticks, every relative link, and every ``docs/<page>.md`` section a code comment points
to are checked here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted((ROOT / "docs").glob("*.md"))
# Top-level folders of the repository, and the server's subpackages (pages name
# ``engine/api.py`` for ``hessian_service/engine/api.py``).
TOP = ("hessian_service/", "clients/", "tests/", "bench/", "scripts/", "docs/")
SUBPACKAGES = ("api/", "wire/", "serving/", "repository/", "engine/")
CODE = re.compile(r"`([^`\s]+)`")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
POINTER = re.compile(r"docs/(\w+\.md)[,(\s]+\"([^\"]+)\"")
HEADING = re.compile(r"^#+ (.+)$", re.MULTILINE)


def _repo_path(token: str) -> Path | None:
    """The file or folder a backticked token names, or None when it is not a path of
    this repository (a URL, an archive member such as ``data/weights/*.pt``, ...).

    A ``.py``, ``.md`` or ``.toml`` token with a folder in it is always a repository
    path: from the root, or from ``hessian_service/`` (so a stale ``app/x.py`` fails).
    A folder token counts when it starts with one of the repository's folders."""
    token = token.split("::")[0]
    if token.endswith((".py", ".md", ".toml")) and "/" in token:
        rooted = ROOT / token
        return rooted if rooted.exists() else ROOT / "hessian_service" / token
    if token.endswith("/") and token.startswith(TOP):
        return ROOT / token
    if token.endswith("/") and token.startswith(SUBPACKAGES):
        return ROOT / "hessian_service" / token
    return None


def test_the_docs_folder_holds_the_pages_the_readme_and_code_point_to() -> None:
    names = {page.name for page in DOCS}
    assert {"architecture.md", "engine.md", "security.md"} <= names


@pytest.mark.parametrize("page", DOCS, ids=lambda page: page.name)
def test_every_path_a_page_names_exists(page: Path) -> None:
    text = page.read_text()
    named = [(token, _repo_path(token)) for token in CODE.findall(text)]
    missing = [token for token, path in named if path is not None and not path.exists()]
    assert missing == []
    assert sum(path is not None for _, path in named) > 0  # the check saw paths at all


@pytest.mark.parametrize("page", DOCS, ids=lambda page: page.name)
def test_every_relative_link_resolves_and_nothing_outside_is_cited(page: Path) -> None:
    text = page.read_text()
    links = [link for link in LINK.findall(text) if "://" not in link]
    assert [link for link in links if not (page.parent / link).exists()] == []
    assert "DESIGN.md" not in text
    assert "../shared" not in text


def test_code_pointers_into_docs_name_sections_that_exist() -> None:
    pointers: list[tuple[str, str, str]] = []
    for source in sorted((ROOT / "hessian_service").rglob("*.py")):
        for page, section in POINTER.findall(source.read_text()):
            pointers.append((source.name, page, section))
    assert ("local_server.py", "engine.md", "The allocator settings") in pointers
    assert ("symmetric.py", "engine.md", "The symmetric product") in pointers
    for name, page, section in pointers:
        headings = HEADING.findall((ROOT / "docs" / page).read_text())
        assert any(heading.startswith(section) for heading in headings), (name, section)
