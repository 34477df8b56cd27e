"""The package's layering, checked on the import statements themselves.

``docs/design.rst`` and the code map in ``teltonika/__init__.py`` promise four things
that nothing else would keep true: the wire layer is pure (no reactor, no I/O, nothing of
ours above it), the protocol layer does not reach up into the command plane or any
storage (``commands/`` uses the protocol's write queue, never the other way round), the
ingestion server never imports the processor (so ``twistd teltonika`` runs without the
processor's extras installed), and the processor imports only the contract and the
shared parts, never the server itself. Every ``import`` counts, including the lazy ones
inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "teltonika"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module the module at *path* imports, absolute names."""
    name = module_name(path)
    return imports_in(path.read_text(), name if path.name != "__init__.py" else name + ".")


def imports_in(source: str, module: str) -> set[str]:
    """Every module *source* imports, as module *module* (relative imports resolved)."""
    found: set[str] = set()
    package = module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], base]).strip(".")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def modules(under: str) -> list[Path]:
    return sorted((PACKAGE / under).rglob("*.py")) if under else sorted(PACKAGE.rglob("*.py"))


def offending(paths: list[Path], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    bad: dict[str, list[str]] = {}
    for path in paths:
        hits = sorted(
            name
            for name in imports_of(path)
            if any(name == f or name.startswith(f + ".") for f in forbidden)
        )
        if hits:
            bad[module_name(path)] = hits
    return bad


def test_the_checker_sees_lazy_and_relative_imports() -> None:
    """A rule that read only the top of a file, or ignored ``from . import``, could not
    fail: the checker itself is checked on modules written to break it both ways."""
    assert "teltonika.protocol.session" in imports_of(PACKAGE / "protocol" / "tcp.py")
    lazy = "def f():\n    from teltonika.commands import queue\n"
    assert "teltonika.commands.queue" in imports_in(lazy, "teltonika.protocol.tcp")
    relative = "from ..commands import queue\n"
    assert "teltonika.commands.queue" in imports_in(relative, "teltonika.protocol.tcp")
    assert "teltonika.protocol.queue" in imports_in(
        "from . import queue\n", "teltonika.protocol.tcp"
    )


def test_the_wire_layer_imports_no_reactor_and_nothing_above_it() -> None:
    """Bytes in, records out: no ``twisted.internet`` (``twisted.plugin`` is how the
    built-in codecs are exported), and of ours only the wire layer and the interfaces."""
    bad = {
        name: sorted(
            hit
            for hit in imports_of(path)
            if hit.startswith("twisted.internet")
            or (
                hit.startswith("teltonika.")
                and not hit.startswith(("teltonika.wire", "teltonika.interfaces"))
            )
        )
        for path in modules("wire")
        if (name := module_name(path))
    }
    assert {name: hits for name, hits in bad.items() if hits} == {}


@pytest.mark.parametrize(
    "upper",
    [
        "teltonika.commands",
        "teltonika.processor",
        "teltonika.sinks",
        "teltonika.redis",
        "teltonika.services",
        "teltonika.cli",
        "teltonika.simulate",
        "teltonika.tap",
    ],
)
def test_the_protocol_layer_does_not_import(upper: str) -> None:
    assert offending(modules("protocol"), (upper,)) == {}


def test_the_ingestion_server_never_imports_the_processor() -> None:
    server = [p for p in modules("") if not module_name(p).startswith("teltonika.processor")]
    assert offending(server, ("teltonika.processor",)) == {}


@pytest.mark.parametrize(
    "server_part",
    [
        "teltonika.protocol",
        "teltonika.sinks",
        "teltonika.commands",
        "teltonika.services.ingestion",
        "teltonika.services.instance_lock",
        "teltonika.codecs",
        "teltonika.authority",
        "teltonika.metrics",
        "teltonika.tap",
    ],
)
def test_the_processor_never_imports_the_server(server_part: str) -> None:
    """The processor shares the contract, the wire records, the Redis helpers, the option
    coercers and the operations endpoint (``services/ops_http``) with the server, and
    nothing that runs device connections or stores their records."""
    assert offending(modules("processor"), (server_part,)) == {}
