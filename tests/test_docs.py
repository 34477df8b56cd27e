"""The documents the code cites exist, and so does every section a citation names.

Code comments and docstrings cite ``docs/protocol.rst``, ``docs/design.rst``,
``docs/operations.rst`` and README.rst by file and section title ("docs/design.rst,
'Publish, then ACK'"). A renamed heading would leave such a citation dangling without
anyone noticing, so every one is checked here against the headings of the file it names;
and nothing may cite documents that are not in the repository. The reStructuredText of
README.rst (the package's long description) and of docs/ must also parse cleanly.
"""

from __future__ import annotations

import io
import itertools
import re
from pathlib import Path

import docutils.core
import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("teltonika", "twisted", "tests", "benchmarks", "scripts")
SOURCE_SUFFIXES = {".py", ".sql", ".js", ".html", ".css", ".sh", ".json", ".cfg", ".toml"}
TOP_FILES = ("README.rst", "Dockerfile", "docker-compose.yml", "setup.cfg", "setup.py")
LARGE = 200_000
"""Files above this size (the test vectors) hold no citations."""

_UNDERLINE = re.compile(r"""^([=\-~^"'`#*+.:_])\1{2,}\s*$""")
_COMMENT_LEAD = re.compile(r"\n[ \t]*(?:#+|--|//|\*(?!\*))?[ \t]*")
_QUOTED = r"""(?:'[^'\n]+'|"[^"\n]+")"""
_CITATION = re.compile(
    r"""(?P<doc>README(?:\.rst)?|docs/[\w.-]+\.rst)(?:``)?(?:'s)?,?[ ]+(?:sections?[ ]+)?"""
    rf"""(?P<titles>{_QUOTED}(?:(?:,[ ]+and[ ]+|,[ ]*|[ ]+and[ ]+){_QUOTED})*)"""
)
_TITLE = re.compile(r"""'([^']+)'|"([^"]+)\"""")
_OUTSIDE = re.compile(
    r"\bseeds? 0\d\d\b|TELTONIKA\.md|\.\./shared\b|\.\./docs\b|\binvariant \d+\b",
    re.IGNORECASE,
)
_BARE_DOC = re.compile(r"\bdocs/[\w.-]+\.rst\b")


def _normalize(text: str) -> str:
    return " ".join(text.replace("``", "").split())


def headings(path: Path) -> set[str]:
    """The section titles of a reStructuredText file, inline literal markup removed."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found = set()
    for above, line in itertools.pairwise(lines):
        text = above.strip()
        if (
            text
            and _UNDERLINE.match(line)
            and not _UNDERLINE.match(above)
            and len(line.rstrip()) >= len(above.rstrip())
            and not above.startswith((" ", "\t"))
        ):
            found.add(_normalize(text))
    return found


def resolves(title: str, titles: set[str]) -> bool:
    """A citation names a heading exactly, or the part of it before a parenthesis or a
    colon: "The processor" for "The processor (twistd teltonika-processor)"."""
    title = _normalize(title)
    return any(
        heading == title or heading.startswith((title + " (", title + ":")) for heading in titles
    )


def source_files() -> list[Path]:
    files = [ROOT / name for name in TOP_FILES if (ROOT / name).exists()]
    files += sorted((ROOT / "docs").glob("*.rst"))
    for directory in SOURCE_DIRS:
        files += sorted(
            path
            for path in (ROOT / directory).rglob("*")
            if path.is_file()
            and path.suffix in SOURCE_SUFFIXES
            and "__pycache__" not in path.parts
            and path.stat().st_size < LARGE
        )
    return files


def citations(text: str) -> list[tuple[str, str]]:
    """``(document, title)`` for every citation in *text*, whatever the line breaks and
    comment markers between its words."""
    joined = _COMMENT_LEAD.sub(" ", text)
    found = []
    for match in _CITATION.finditer(joined):
        doc = match["doc"]
        doc = "README.rst" if doc.startswith("README") else doc
        for single, double in _TITLE.findall(match["titles"]):
            found.append((doc, single or double))
    return found


def test_every_cited_section_exists() -> None:
    """Each "docs/X.rst, 'Section'" and 'README.rst, "Section"' in the code, the tests,
    README and docs/ names a heading of that document."""
    known: dict[str, set[str]] = {}
    dangling = []
    count = 0
    for path in source_files():
        if path.name == "test_docs.py":
            continue
        for doc, title in citations(path.read_text(encoding="utf-8", errors="replace")):
            count += 1
            target = ROOT / doc
            if doc not in known:
                known[doc] = headings(target) if target.exists() else set()
            if not resolves(title, known[doc]):
                dangling.append(f"{path.relative_to(ROOT)}: {doc}, {title!r}")
    assert count > 50, f"only {count} citations found: the pattern no longer matches"
    assert not dangling, "citations of missing sections:\n" + "\n".join(dangling)


def test_code_cites_only_documents_in_the_repository() -> None:
    """No citation of planning documents or references outside the repository, and every
    docs/ file the code names exists."""
    offending = []
    for path in source_files():
        if path.name == "test_docs.py":
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in _OUTSIDE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            offending.append(f"{path.relative_to(ROOT)}:{line}: {match.group()!r}")
        if path.parts[len(ROOT.parts)] in SOURCE_DIRS:
            for match in _BARE_DOC.finditer(text):
                if not (ROOT / match.group()).exists():
                    offending.append(f"{path.relative_to(ROOT)}: {match.group()} does not exist")
    assert not offending, "\n".join(offending)


def test_citation_pattern() -> None:
    """The forms of citation the code uses, across line breaks and comment markers."""
    text = (
        "x (docs/protocol.rst, sections 'The TCP session', 'ACK and\n"
        "    retransmission' and 'Reply summary'); y (docs/design.rst,\n"
        "# 'Publish, then ACK') z README.rst, \"Exactly once, and what that means\"\n"
        '-- and ``docs/live-v1.rst``, "Ordering"; README\'s "The session"; --seed 004'
    )
    assert citations(text) == [
        ("docs/protocol.rst", "The TCP session"),
        ("docs/protocol.rst", "ACK and retransmission"),
        ("docs/protocol.rst", "Reply summary"),
        ("docs/design.rst", "Publish, then ACK"),
        ("README.rst", "Exactly once, and what that means"),
        ("docs/live-v1.rst", "Ordering"),
        ("README.rst", "The session"),
    ]
    titles = {"The processor (twistd teltonika-processor)", "Commands"}
    assert resolves("The processor", titles)
    assert resolves("Commands", titles)
    assert not resolves("Processor", titles)
    assert not resolves("Command", titles)
    assert _OUTSIDE.search("(seed 004, rule 7)")
    assert not _OUTSIDE.search("--seed 4; random seed (tracks)")


@pytest.mark.parametrize(
    "name", ["README.rst", *sorted(p.name for p in (ROOT / "docs").glob("*.rst"))]
)
def test_restructuredtext_is_clean(name: str) -> None:
    """No docutils warning or error: tables line up, every `Section`_ link resolves."""
    path = ROOT / name if name == "README.rst" else ROOT / "docs" / name
    warnings = io.StringIO()
    docutils.core.publish_doctree(
        path.read_text(encoding="utf-8"),
        source_path=str(path),
        settings_overrides={"report_level": 2, "halt_level": 5, "warning_stream": warnings},
    )
    assert warnings.getvalue() == ""


def test_code_map_names_every_top_level_module() -> None:
    """``teltonika/__init__.py``'s docstring is the code map: every module and subpackage
    of the top-level package is in it, so a new or moved one cannot go unmapped."""
    import teltonika

    doc = teltonika.__doc__ or ""
    package = ROOT / "teltonika"
    names = [
        f"``{path.stem}``"
        for path in package.glob("*.py")
        if path.stem not in ("__init__", "__main__")
    ]
    names += [
        f"``{path.name}/``"
        for path in package.iterdir()
        if path.is_dir() and (path / "__init__.py").exists()
    ]
    missing = sorted(name for name in names if name not in doc)
    assert not missing, f"not in the code map of teltonika/__init__.py: {missing}"
