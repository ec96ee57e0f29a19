"""Shared behaviour of midigen's dataclass configs: save to JSON and load back equal."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

from midigen.errors import MidigenError

C = TypeVar("C", bound="JsonConfig")


class JsonConfig:
    """Mixin for dataclass configs: `to_dict`/`from_dict`, `save`/`load`, unknown keys rejected."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise MidigenError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
        fields = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name in data:
                value = data[f.name]
                # JSON has no tuples; the configs use tuples for immutable sequences.
                fields[f.name] = tuple(value) if isinstance(value, list) else value
        return cls(**fields)

    def save(self, path: str | Path) -> None:
        from midigen.io_utils import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls: type[C], path: str | Path) -> C:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise MidigenError(f"{path}: cannot read {cls.__name__}: {exc}") from exc
        return cls.from_dict(data)
