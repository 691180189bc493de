"""The documentation's cross-references resolve.

- Every ``docs/<name>.md §N[.M]`` in the code or the docs names a numbered heading of that document, and an
  ``item K`` / ``step K`` after it names a numbered list item of that section.
- Every ``docs/<name>.md, defect N`` (or ``defects N, M and K``) names a numbered defect of docs/method.md §12.
- In the code, no ``§`` or ``defect N`` goes without the document it cites on the same line, and no citation of the
  old unnamed form (``reference section 8``, ``reference 10``, ``section 7 of the reference``) is left.
- Every relative link in README.md and docs/*.md points at an existing file, and its ``#anchor`` at a heading there
  (GitHub's anchor rule).
"""
from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CODE_ROOTS = ("models", "utils", "tests", "benchmarks")
DEFECT_DOC = "method.md"
DEFECT_SECTION = "12"

# "docs/method.md §8.1 item 5, §8.3 and §10": the document, then a chain of section references.
_SECTION_REF = r"§\d+(?:\.\d+)*(?: (?:item|step) \d+)?"
CITATION = re.compile(r"docs/([\w-]+\.md)((?:(?:,? and |, | )" + _SECTION_REF + r")+)")
SECTION = re.compile(r"§(\d+(?:\.\d+)*)(?: (item|step) (\d+))?")
DEFECTS = re.compile(r"docs/([\w-]+\.md),? defects? (\d+(?:(?:, | and )\d+)*)")
DOC_NAME = re.compile(r"docs/([\w-]+\.md)")
LONE_SECTION = re.compile(r"§\s*\d")
LONE_DEFECT = re.compile(r"\bdefects? \d", re.IGNORECASE)
OLD_FORM = re.compile(r"\breference (?:sections? )?\d|\bsections? \d+(?:\.\d+)* of the reference|original_design\.md",
                      re.IGNORECASE)
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
NUMBERED_HEADING = re.compile(r"^(\d+(?:\.\d+)*)\.?\s")
LIST_ITEM = re.compile(r"^\s*(\d+)\.\s")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"`[^`]*`")


def code_files() -> list[Path]:
    files = [p for root in CODE_ROOTS for p in sorted((REPO / root).rglob("*.py"))]
    files += sorted(REPO.glob("Step*.py")) + [REPO / "reconstruct.py"]
    return [p for p in files if p.resolve() != Path(__file__).resolve() and ".venv" not in p.parts]


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def prose_lines(path: Path):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


class Doc:
    """A Markdown file's anchors, numbered sections (with their numbered list items) and numbered defects."""

    def __init__(self, path: Path):
        self.path = path
        self.anchors: set[str] = set()
        self.items: dict[str, set[int]] = {}  # section number -> numbers of its list items
        seen: dict[str, int] = {}
        current: list[str] = []  # the numbered sections the current line is in, innermost last
        for _, line in prose_lines(path):
            heading = HEADING.match(line)
            if heading:
                anchor = github_anchor(heading.group(2))
                self.anchors.add(anchor if anchor not in seen else f"{anchor}-{seen[anchor]}")
                seen[anchor] = seen.get(anchor, 0) + 1
                number = NUMBERED_HEADING.match(heading.group(2))
                depth = len(heading.group(1))
                if number:
                    current = [s for s in current if s.count(".") < number.group(1).count(".")] + [number.group(1)]
                    self.items.setdefault(number.group(1), set())
                elif depth <= 2:
                    current = []
                continue
            item = LIST_ITEM.match(line)
            if item and current:
                self.items[current[-1]].add(int(item.group(1)))

    @property
    def defects(self) -> set[int]:
        return self.items.get(DEFECT_SECTION, set())


@cache
def doc(name: str) -> Doc | None:
    path = REPO / "docs" / name
    return Doc(path) if path.is_file() else None


def citation_problems(text: str) -> list[str]:
    """What is wrong with the "docs/<name>.md §..." and "docs/<name>.md, defect N" citations in one line."""
    problems = []
    for name in DOC_NAME.findall(text):
        if doc(name) is None:
            problems.append(f"docs/{name} does not exist")
    for match in CITATION.finditer(text):
        target = doc(match.group(1))
        if target is None:
            continue
        for section, kind, item in SECTION.findall(match.group(2)):
            if section not in target.items:
                problems.append(f"docs/{match.group(1)} has no section {section}")
            elif item and int(item) not in target.items[section]:
                problems.append(f"docs/{match.group(1)} §{section} has no {kind} {item}")
    for match in DEFECTS.finditer(text):
        target = doc(match.group(1))
        if target is None:
            continue
        if match.group(1) != DEFECT_DOC:
            problems.append(f"defects are numbered in docs/{DEFECT_DOC}, not docs/{match.group(1)}")
            continue
        for number in re.findall(r"\d+", match.group(2)):
            if int(number) not in target.defects:
                problems.append(f"docs/{DEFECT_DOC} has no defect {number}")
    return problems


def uncovered(pattern: re.Pattern, text: str, covered: list[tuple[int, int]]) -> bool:
    return any(not any(a <= m.start() < b for a, b in covered) for m in pattern.finditer(text))


def code_problems(path: Path, root: Path = REPO) -> list[str]:
    """Every problem with the citations of one source file, as "path:line: what" (path relative to ``root``)."""
    rel = path.relative_to(root)
    problems = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        where = f"{rel}:{number}"
        problems += [f"{where}: {p}" for p in citation_problems(line)]
        if uncovered(LONE_SECTION, line, [m.span() for m in CITATION.finditer(line)]):
            problems.append(f"{where}: a § citation must name its document on the same line (docs/method.md §N)")
        if uncovered(LONE_DEFECT, line, [m.span() for m in DEFECTS.finditer(line)]):
            problems.append(f"{where}: a defect citation must name its document (docs/method.md, defect N)")
        if OLD_FORM.search(line):
            problems.append(f"{where}: an unnamed reference citation; write docs/method.md §N")
    return problems


def link_problems(path: Path, root: Path = REPO) -> list[str]:
    """Every broken link or citation of one Markdown file, as "path:line: what" (path relative to ``root``)."""
    rel = path.relative_to(root)
    problems = []
    for number, line in prose_lines(path):
        problems += [f"{rel}:{number}: {p}" for p in citation_problems(line)]
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            file = (path.parent / file_part).resolve() if file_part else path
            if not file.exists():
                problems.append(f"{rel}:{number}: link to {target}: {file_part} does not exist")
            elif anchor and file.suffix == ".md" and anchor not in Doc(file).anchors:
                problems.append(f"{rel}:{number}: link to {target}: no heading with anchor #{anchor}")
    return sorted(set(problems))


# ------------------------------------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("path", code_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_code_citations_resolve(path):
    assert code_problems(path) == []


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_markdown_links_and_citations_resolve(path):
    assert link_problems(path) == []


def test_method_doc_has_the_sections_and_defects_the_code_cites():
    """The targets exist at all (so a checker that parses nothing cannot pass the tests above vacuously)."""
    method = doc("method.md")
    assert method is not None
    assert {"0", "2.5", "3.2", "5", "7", "8", "8.1", "8.3", "9", "10", "11", "12"} <= set(method.items)
    assert method.defects == set(range(1, 30))
    assert {1, 2, 3, 4, 5} <= method.items["8.1"]
    cited = [line for p in code_files() for line in p.read_text(encoding="utf-8").splitlines() if CITATION.search(line)]
    assert len(cited) >= 20


@pytest.mark.parametrize("text, problem", [
    ("see docs/method.md §8.3", None),
    ("see docs/method.md §8.1 item 5, §8.3 and §10", None),
    ("(docs/method.md, defects 5, 6, 17)", None),
    ("see docs/method.md §8.9", "has no section 8.9"),
    ("see docs/method.md §8.1 item 9", "§8.1 has no item 9"),
    ("see docs/method.md §8.1 and §99", "has no section 99"),
    ("(docs/method.md, defects 5 and 30)", "has no defect 30"),
    ("see docs/nowhere.md §1", "docs/nowhere.md does not exist"),
])
def test_checker_catches_a_broken_citation(text, problem):
    problems = citation_problems(text)
    if problem is None:
        assert problems == []
    else:
        assert any(problem in p for p in problems), problems


def test_checker_catches_unnamed_and_lone_citations(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""Loss (reference section 8.3), as in section 7 of the reference; see §9 and defect 7."""\n')
    problems = "\n".join(code_problems(bad, root=tmp_path))
    assert "unnamed reference citation" in problems
    assert "§ citation must name its document" in problems
    assert "defect citation must name its document" in problems


def test_checker_catches_a_broken_link_and_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# Title\n\n## 2. A section\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#2-a-section) [web](https://example.org)\n"
                    "[gone](missing.md) [bad anchor](other.md#no-such-heading)\n"
                    "```\n[in code](missing.md)\n```\n")
    found = link_problems(page, root=tmp_path)
    problems = "\n".join(found)
    assert "missing.md does not exist" in problems
    assert "no heading with anchor #no-such-heading" in problems
    assert len(found) == 2, found  # the good link, the web link and the link in a code block pass

