"""The documentation the code points at exists: every ``docs/<name>.md §N`` citation resolves to a section."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CITATION = re.compile(r"docs/([\w-]+\.md) §(\d+(?:\.\d+)?)")
SCANNED = ("ko_lightning", "recipes", "benchmarks", "tests")


def _citations() -> list[tuple[str, str, str]]:
    found = []
    for top in SCANNED:
        for file in sorted((ROOT / top).rglob("*")):
            if file.suffix not in (".py", ".md", ".yaml") or file == Path(__file__):
                continue
            for doc, section in CITATION.findall(file.read_text(encoding="utf-8")):
                found.append((str(file.relative_to(ROOT)), doc, section))
    for doc, section in CITATION.findall((ROOT / "README.md").read_text(encoding="utf-8")):
        found.append(("README.md", doc, section))
    return found


def _sections(doc: Path) -> set[str]:
    """Section numbers of the headings: ``## 3. Title`` gives "3", ``### 3.6 Title`` gives "3.6"."""
    return set(re.findall(r"^#{2,4} (\d+(?:\.\d+)?)\.? ", doc.read_text(encoding="utf-8"), flags=re.MULTILINE))


def test_the_docstrings_cite_the_docs_and_no_citation_points_into_nothing() -> None:
    citations = _citations()
    assert len({c[0] for c in citations if c[0].startswith("ko_lightning/")}) >= 10  # the package does cite them
    missing = []
    for source, doc, section in citations:
        path = ROOT / "docs" / doc
        if not path.is_file() or section not in _sections(path):
            missing.append(f"{source}: docs/{doc} §{section}")
    assert not missing, "citations without a section:\n" + "\n".join(missing)


def test_no_docstring_cites_the_internal_spec() -> None:
    """Users never see the team's spec (ko-math): the package must cite its own docs/."""
    offenders = [
        str(f.relative_to(ROOT))
        for f in (ROOT / "ko_lightning").rglob("*.py")
        if "ko-math" in f.read_text(encoding="utf-8")
    ]
    assert not offenders, offenders
