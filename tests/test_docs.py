"""Every reference in the repository points at something a user of the package can open.

Code, tests and documents cite the documentation as `docs/<file>.md §<section>` (a section
number such as `§5.5`, or a one-word heading such as `§Catalog`, several separated by commas).
This test fails when a cited file is not in docs/, when a cited section is not a heading of that
file, or when anything cites material outside the repository (a top-level DESIGN.md, the
research notes, `../shared`, numbered issues of the tracker, a task brief). Inside docs/, a bare
`§<section>` means a section of the same file. Pure text, no imports of the package.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED_DIRS = ("corruptcheck", "reference", "tests", "bench", "golden", "docs")
SCANNED_FILES = ("README.md", "Makefile", "pyproject.toml")
SUFFIXES = {".py", ".md", ".toml"}
SELF = Path(__file__).name  # holds the forbidden patterns themselves

REF = r"§(?:\d+(?:\.\d+)*|[A-Za-z][\w-]*)"
SECTION = re.compile(REF)
CITATION = re.compile(r"(?<![\w/.-])docs/([\w.-]+\.md)`?\s*(" + REF + r"(?:\s*,\s*" + REF + r")*)?")
LINK = re.compile(r"\]\((?!https?:|#|mailto:)([^)#\s]+\.md)(?:#[^)]*)?\)")
# a fault's `catalog` field names a trap of docs/v4-spec.md §10 by its bare number (docs/faults.md §Catalog)
CATALOG_FIELD = re.compile(r"""catalog\s*=\s*["']([^"']*)["']""")
OUTSIDE = [
    (re.compile(r"\bDESIGN\b"), "the private design notes (DESIGN.md)"),
    (re.compile(r"\.\./shared|\bshared/"), "a path outside the repository (shared/)"),
    (re.compile(r"\bresearch/"), "the research notes (research/)"),
    (re.compile(r"(?<!docs/)\bengine-capture\.md"), "engine-capture.md outside docs/"),
    (re.compile(r"fault-catalog|anchors\.md|v4-architecture|v4-reports"), "a research note"),
    (re.compile(r"\b[Ss]pec §"), "'spec §' without a file in docs/"),
    (re.compile(r"\barch(?:itecture)? notes\b", re.I), "the architecture notes"),
    (re.compile(r"\bissue \d+\b"), "a numbered issue of the tracker"),
    (re.compile(r"\btask brief\b"), "a task brief"),
]


def scanned_files(root: Path) -> list[Path]:
    files = [root / name for name in SCANNED_FILES if (root / name).is_file()]
    for d in SCANNED_DIRS:
        if (root / d).is_dir():
            files += [p for p in sorted((root / d).rglob("*"))
                      if p.is_file() and p.suffix in SUFFIXES and p.name != SELF and "__pycache__" not in p.parts]
    return files


def headings(path: Path) -> tuple[set, set]:
    """(section numbers, first words of titles) of the markdown headings of `path`, outside
    fenced code blocks."""
    numbers, words, fenced = set(), set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = re.match(r"#{1,6}\s+(.*)", line)
        if fenced or not m:
            continue
        title = m.group(1).strip()
        num = re.match(r"(\d+(?:\.\d+)*)\.?\s+(.*)", title)
        if num:
            numbers.add(num.group(1))
            title = num.group(2)
        first = re.match(r"[`*_]*([A-Za-z][\w-]*)", title)
        if first:
            words.add(first.group(1))
    return numbers, words


def _check_sections(docs: Path, name: str, refs: list[str], cache: dict) -> list[str]:
    path = docs / name
    if name not in cache:
        cache[name] = headings(path)
    numbers, words = cache[name]
    bad = []
    for ref in refs:
        key = ref[1:]
        ok = key in numbers if key[0].isdigit() else key in words
        if not ok:
            bad.append(f"docs/{name} has no section {ref}")
    return bad


def problems(root: Path = ROOT) -> list[str]:
    """One line per broken or outside reference under `root`."""
    docs = root / "docs"
    cache: dict = {}
    out = []
    for path in scanned_files(root):
        rel = path.relative_to(root).as_posix()
        in_docs = rel.startswith("docs/")
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{rel}:{lineno}"
            for pattern, what in OUTSIDE:
                if pattern.search(line):
                    out.append(f"{where}: cites {what}: {line.strip()}")
        text = path.read_text(encoding="utf-8")
        attached = set()  # offsets of § signs that belong to a docs/<file>.md citation
        for m in CITATION.finditer(text):
            name = m.group(1)
            where = f"{rel}:{text.count(chr(10), 0, m.start()) + 1}"
            if not (docs / name).is_file():
                out.append(f"{where}: docs/{name} does not exist")
                continue
            if m.group(2):
                refs = SECTION.findall(m.group(2))
                attached |= {m.start(2) + s.start() for s in SECTION.finditer(m.group(2))}
                out += [f"{where}: {msg}" for msg in _check_sections(docs, name, refs, cache)]
        if in_docs:
            for m in LINK.finditer(text):
                if not (path.parent / m.group(1)).is_file():
                    out.append(f"{rel}: link to {m.group(1)}, which does not exist")
        catalog_spans = [m.span(1) for m in CATALOG_FIELD.finditer(text)]
        for m in SECTION.finditer(text):
            if m.start() in attached:
                continue
            where = f"{rel}:{text.count(chr(10), 0, m.start()) + 1}"
            if in_docs:  # a section of the same document
                out += [f"{where}: {msg}" for msg in _check_sections(docs, path.name, [m.group(0)], cache)]
            elif any(a <= m.start() < b for a, b in catalog_spans):
                out += [f"{where}: {msg}" for msg in _check_sections(docs, "v4-spec.md", [m.group(0)], cache)]
            else:
                out.append(f"{where}: {m.group(0)} names no file (cite it as docs/<file>.md {m.group(0)})")
    return out


def test_every_reference_resolves_inside_the_repository():
    found = problems(ROOT)
    assert not found, "\n".join(found)


def test_the_scan_covers_code_tests_and_docs():
    names = {p.relative_to(ROOT).as_posix() for p in scanned_files(ROOT)}
    assert {"corruptcheck/cli/app.py", "reference/model.py", "tests/test_cli.py", "bench/run.py",
            "docs/design.md", "docs/v4-spec.md", "README.md"} <= names


def _tree(tmp_path: Path, code: str) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "spec.md").write_text("# Spec\n\n## 1. Model\n\n### 1.2 Router\n\n## Catalog\n\n"
                                               "```\n# 9. not a heading\n```\n")
    (tmp_path / "docs" / "v4-spec.md").write_text("# V4\n\n## 10. Traps\n\n### 10.5 Causality\n")
    (tmp_path / "corruptcheck").mkdir()
    (tmp_path / "corruptcheck" / "mod.py").write_text(code)
    return tmp_path


GOOD = [
    '"""See docs/spec.md §1.2 and `docs/spec.md` §Catalog."""\n',
    '"""Several: docs/spec.md §1, §1.2, §Catalog."""\n',
    'catalog = "§10.5, vllm-ascend-deepseekv4#76"\n',
]
BAD = [
    ('"""See docs/missing.md §1."""\n', "docs/missing.md does not exist"),
    ('"""See docs/spec.md §3."""\n', "docs/spec.md has no section §3"),
    ('"""See docs/spec.md §1.2, §9."""\n', "docs/spec.md has no section §9"),
    ('"""See docs/spec.md §Routing."""\n', "docs/spec.md has no section §Routing"),
    ('"""The dump format (DESIGN.md §5)."""\n', "the private design notes"),
    ('# shared/research/engine-capture.md §2.3\n', "a path outside the repository"),
    ('# see ../shared/notes.md\n', "a path outside the repository"),
    ('# from research/v4.md\n', "the research notes"),
    ('"""Spec §4.3: Sinkhorn."""\n', "'spec §' without a file"),
    ('"""Sinkhorn (§4.3)."""\n', "§4.3 names no file"),
    ('catalog = "§10.9"\n', "docs/v4-spec.md has no section §10.9"),
]


@pytest.mark.parametrize("code", GOOD)
def test_good_references_pass(tmp_path, code):
    assert problems(_tree(tmp_path, code)) == []


@pytest.mark.parametrize("code,message", BAD)
def test_planted_bad_reference_fails(tmp_path, code, message):
    found = problems(_tree(tmp_path, code))
    assert found and any(message in line for line in found), found
    assert all(line.startswith("corruptcheck/mod.py:1:") for line in found), found


def test_bare_sections_inside_docs_resolve_against_the_same_file(tmp_path):
    root = _tree(tmp_path, "")
    (root / "docs" / "other.md").write_text("# Other\n\n## 2. Part\n\nSee §2 and §Other; not §7.\n"
                                            "[link](spec.md) [gone](gone.md)\n")
    found = problems(root)
    assert len(found) == 2, found
    assert any("docs/other.md has no section §7" in line for line in found), found
    assert any("link to gone.md" in line for line in found), found


def test_readme_maps_every_document():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    unmapped = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if f"`docs/{p.name}`" not in readme]
    assert not unmapped, f"README.md's map of docs/ does not name {unmapped}"
