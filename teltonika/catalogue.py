"""The IO element catalogue: a named, scaled view of raw IO values.

Raw values are always what we store and publish; this catalogue only *adds* names. It
ships as ``teltonika/data/io_catalogue.json`` (id -> name, unit, scale, signedness) and a
deployment extends or overrides it with more files of the same shape::

    {"elements": {"<id>": {"name": ..., "unit": ..., "scale": ..., "signed": ...}},
     "models": {"FMB640": {"elements": {"<id>": {...}}}}}

Later files win, entry by entry; a model's entries win over the general ones for that
model. Extra files come from ``--catalogue PATH`` or the ``TELTONIKA_IO_CATALOGUE``
environment variable (paths separated by ``os.pathsep``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from importlib.resources import files
from typing import Any, Final

import attrs

from teltonika.wire.records import NX, IOElement

ENVIRONMENT_VARIABLE: Final = "TELTONIKA_IO_CATALOGUE"


@attrs.frozen(slots=True)
class IODefinition:
    """What one IO id means: name, unit (or None), scale factor and signedness."""

    name: str
    unit: str | None = None
    scale: float = 1
    signed: bool = False

    def interpret(self, width: int, value: int | bytes) -> int | float | str:
        """The value in its unit: two's complement when signed, then scaled.

        NX (bytes) values come back as hex: their meaning is element-specific.
        """
        if isinstance(value, bytes) or width == NX:
            return value.hex() if isinstance(value, bytes) else value
        if self.signed and value >= 1 << (8 * width - 1):
            value -= 1 << (8 * width)
        if self.scale == 1:
            return value
        # Scales are decimal fractions (0.1, 0.001): dividing by the exact integer
        # divisor gives the correctly rounded decimal (2147483647 * 0.1 would print as
        # 214748364.70000002); other scales multiply.
        divisor = round(1 / self.scale)
        if divisor > 1 and abs(divisor * self.scale - 1) < 1e-12:
            return value / divisor
        return round(value * self.scale, 10)


def _parse(raw: Mapping[str, Any], source: str) -> dict[int, IODefinition]:
    out: dict[int, IODefinition] = {}
    for key, entry in raw.items():
        try:
            out[int(key)] = IODefinition(
                name=str(entry["name"]),
                unit=entry.get("unit"),
                scale=float(entry.get("scale", 1)),
                signed=bool(entry.get("signed", False)),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{source}: bad IO catalogue entry {key!r}: {error}") from None
    return out


class Catalogue:
    """IO definitions in layers: built-in, then deployment files, then per model."""

    def __init__(
        self,
        elements: Mapping[int, IODefinition],
        models: Mapping[str, Mapping[int, IODefinition]] | None = None,
    ) -> None:
        self._elements = dict(elements)
        self._models = {name: dict(defs) for name, defs in (models or {}).items()}

    @classmethod
    def load(cls, extra: Iterable[str] = (), *, use_environment: bool = True) -> Catalogue:
        """The built-in catalogue with *extra* files (and the environment's) layered on top."""
        builtin = files("teltonika").joinpath("data/io_catalogue.json").read_text("utf-8")
        documents = [("built-in", json.loads(builtin))]
        paths = list(extra)
        if use_environment and os.environ.get(ENVIRONMENT_VARIABLE):
            paths = os.environ[ENVIRONMENT_VARIABLE].split(os.pathsep) + paths
        for path in paths:
            with open(path, encoding="utf-8") as handle:
                documents.append((path, json.load(handle)))
        elements: dict[int, IODefinition] = {}
        models: dict[str, dict[int, IODefinition]] = {}
        for source, document in documents:
            elements.update(_parse(document.get("elements", {}), source))
            for model, body in document.get("models", {}).items():
                models.setdefault(model, {}).update(_parse(body.get("elements", {}), source))
        return cls(elements, models)

    def get(self, io_id: int, model: str | None = None) -> IODefinition | None:
        """The definition of *io_id* for *model* (or in general), or None if unknown."""
        if model is not None:
            found = self._models.get(model, {}).get(io_id)
            if found is not None:
                return found
        return self._elements.get(io_id)

    def named(
        self, io: tuple[IOElement, ...], model: str | None = None
    ) -> dict[str, dict[str, object]]:
        """The named view of IO elements: ``{"<id>": {"name", "unit", "value", "raw"}}``.

        Unknown ids keep their raw value with ``name`` None.
        """
        out: dict[str, dict[str, object]] = {}
        for io_id, width, value in io:
            raw: object = value.hex() if isinstance(value, bytes) else value
            definition = self.get(io_id, model)
            if definition is None:
                out[str(io_id)] = {"name": None, "unit": None, "value": raw, "raw": raw}
            else:
                out[str(io_id)] = {
                    "name": definition.name,
                    "unit": definition.unit,
                    "value": definition.interpret(width, value),
                    "raw": raw,
                }
        return out
