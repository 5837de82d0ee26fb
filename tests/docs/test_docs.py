"""The docs stand alone: every relative link in every Markdown file of the repository resolves
(its file, and its #anchor when it names one), no link leaves the repository, and the pages
that describe the code name everything the code has (decision reasons, names, check
findings)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

from injector.injection import policy
from injector.kube import check
from injector.mesh import names

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
PAGES = ("cli", "http-api", "grpc-api", "configuration", "metrics", "decision", "annotations",
         "istio-compatibility", "operating")


def markdown_files() -> list[Path]:
    """Every Markdown file git knows of or would add (untracked but not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=30).stdout.split()
    return [ROOT / name for name in listed if (ROOT / name).exists()]


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings: lower case, punctuation dropped, spaces to -."""
    found = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        title = line.lstrip("#").strip().lower()
        found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    return LINK.findall(text)


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_stays_in_the_repository_and_resolves(page: Path) -> None:
    for target in links(page):
        assert not re.match(r"^[a-z][a-z0-9+.-]*:", target), (
            f"{page.relative_to(ROOT)}: {target} leaves the repository")
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / unquote(path_part)).resolve() if path_part else page
        assert resolved.is_relative_to(ROOT), f"{page.relative_to(ROOT)}: {target} is outside"
        assert resolved.exists(), f"{page.relative_to(ROOT)}: {target} does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), (
                f"{page.relative_to(ROOT)}: {target}: no heading with anchor #{anchor}")


def test_the_readme_links_every_page_of_the_docs() -> None:
    readme = links(ROOT / "README.md")
    for page in PAGES:
        assert f"docs/{page}.md" in readme, f"README does not link docs/{page}.md"
    assert sorted(p.stem for p in DOCS.glob("*.md")) == sorted(PAGES)


def test_the_decision_page_names_every_reason_of_the_code() -> None:
    reasons = {value.reason for value in vars(policy).values()
               if isinstance(value, policy.Decision)}
    section = (DOCS / "decision.md").read_text().split("## 2.", 1)[1]
    table = "\n".join(line for line in section.splitlines() if line.startswith("| "))
    results = {cell.split("|")[3] for cell in table.splitlines()[2:]}
    documented = set(re.findall(r"`([a-z]+(?:-[a-z]+)+)`", "".join(results)))
    assert documented == reasons


def test_the_annotations_page_names_every_label_annotation_and_object() -> None:
    text = (DOCS / "annotations.md").read_text()
    # Every label and annotation (the names with a prefix/), the containers, volumes and
    # objects it adds or keeps.
    wanted = [value for name, value in vars(names).items()
              if name.isupper() and isinstance(value, str) and "/" in value]
    wanted += [names.NAMESPACE_LABEL, names.PROXY_CONTAINER, names.INIT_CONTAINER,
               names.ROOT_CERT_CONFIGMAP, names.SHARED_CA_SECRET, *names.VOLUME_NAMES]
    missing = [value for value in wanted if f"`{value}`" not in text
               and f"{value}`" not in text]
    assert not missing, f"docs/annotations.md does not mention {missing}"


def finding_codes() -> set[str]:
    sources = [ROOT / "injector" / "injection" / "explain.py",
               ROOT / "injector" / "kube" / "check.py"]
    codes = {code for source in sources for code in re.findall(
        r"\"([a-z]+(?:-[a-z]+)*)\",\s*\"(?:ok|problem|info)\"", source.read_text())}
    codes.update(code for _, code, _, _ in check._CALL_FAILURES)
    return codes - {"ok", "problem", "info"}  # the statuses themselves, in their type


def test_the_operating_page_explains_every_finding_of_check() -> None:
    text = (DOCS / "operating.md").read_text().split("## Troubleshooting", 1)[1]
    documented = set(re.findall(r"`([a-z]+(?:-[a-z]+)*)`", text))
    missing = finding_codes() - documented
    assert not missing, f"docs/operating.md does not explain {sorted(missing)}"


def test_every_page_is_plain_markdown_a_person_can_read() -> None:
    for page in PAGES:
        text = (DOCS / f"{page}.md").read_text()
        assert text.startswith("# "), page
        assert text.count("```") % 2 == 0, f"{page}: a code block is not closed"
