"""Cross-references by name between the pages resolve: `formats.md section 9` names a numbered heading of
formats.md, and `quantizer.md, "Bad checkpoints"` a heading or a bold paragraph title there.

Links with anchors are checked by tests/test_docs_figures.py; these references are prose, which renumbering
a section or renaming a paragraph would leave pointing nowhere.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: `NAME.md` (a link's closing parenthesis and a comma may follow), then `section N[.M]` or a quoted title.
_REF = re.compile(r'\b([a-z0-9-]+)\.md\)?,?\s+(?:\(?"([^"]+)"|section\s+(\d+(?:\.\d+)?)\b)')


def _titles(page: Path) -> list[str]:
    """The page's headings and bold spans (paragraph titles such as `**Padding.**`), backticks dropped."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    found = re.findall(r"^#+\s+(.*)$", text, re.M) + re.findall(r"\*\*(.+?)\*\*", re.sub(r"\s+", " ", text))
    return [t.replace("`", "").strip() for t in found]


def _has_title(titles: list[str], title: str) -> bool:
    """A heading or paragraph title begins with ``title``, its section number (`7. From Python`) aside."""
    return any(t.startswith(title) or re.sub(r"^\d+(\.\d+)*\.?\s+", "", t).startswith(title) for t in titles)


def broken_xrefs(pages: list[Path], docs: Path) -> list[str]:
    bad = []
    for page in pages:
        text = re.sub(r"\s+", " ", re.sub(r"```.*?```", "", page.read_text(), flags=re.S))
        for m in _REF.finditer(text):
            target = docs / f"{m[1]}.md"
            if not target.is_file():
                continue                        # a file that is no page: the link checker's business
            titles = _titles(target)
            if m[2] is not None:
                title = m[2].replace("`", "").strip()
                if not _has_title(titles, title):
                    bad.append(f'{page.name}: {m[1]}.md "{title}": no such heading or paragraph')
            elif not any(re.match(rf"{re.escape(m[3])}[.\s]", t) for t in titles):
                bad.append(f"{page.name}: {m[1]}.md section {m[3]}: no such section")
    return bad


def test_every_section_and_titled_reference_of_the_docs_resolves(tmp_path):
    pages = [ROOT / "README.md", *sorted(ROOT.joinpath("docs").glob("*.md"))]
    assert broken_xrefs(pages, ROOT / "docs") == []
    # the checker can fail: a section number and a title the target does not have
    docs = tmp_path / "docs"
    docs.mkdir()
    docs.joinpath("t.md").write_text("# T\n\n## 1. One\n\n### 1.1 Sub\n\n**Padding.** text\n")
    page = tmp_path / "p.md"
    page.write_text('See t.md section 1, t.md section 1.1, [t](t.md), "Padding" and t.md section 2, '
                    '(t.md, "Padding"), (t.md, "Nope") and\nt.md section 1.2.\n')
    assert broken_xrefs([page], docs) == ["p.md: t.md section 2: no such section",
                                          'p.md: t.md "Nope": no such heading or paragraph',
                                          "p.md: t.md section 1.2: no such section"]
