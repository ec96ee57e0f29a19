"""Shared behaviour of midigen's dataclass configs: save to JSON and load back equal."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from midigen.errors import MidigenError

C = TypeVar("C", bound="JsonConfig")


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value can stand for a field annotated `hint` (int, float, str, bool, X | None, tuple[...])."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    return True


class JsonConfig:
    """Mixin for dataclass configs: `to_dict`/`from_dict`, `save`/`load`, unknown keys rejected."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], complete: bool = False) -> C:
        """The config `data` describes. Unknown fields and values of the wrong type are refused; with `complete`,
        so are missing fields (a saved config names them all)."""
        if not isinstance(data, dict):
            raise MidigenError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise MidigenError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
        missing = sorted(names - set(data))
        if complete and missing:
            raise MidigenError(f"{cls.__name__}: missing field(s) {', '.join(missing)}")
        hints = typing.get_type_hints(cls)
        fields = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name in data:
                value = data[f.name]
                if not _fits(value, hints[f.name]):
                    raise MidigenError(f"{cls.__name__}: field {f.name} must be {hints[f.name]}, got {value!r}")
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
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MidigenError(f"{path}: cannot read {cls.__name__}: {exc}") from None
        try:
            return cls.from_saved(data)
        except MidigenError as exc:
            raise MidigenError(f"{path}: {exc}") from None

    @classmethod
    def from_saved(cls: type[C], data: Any) -> C:
        """The config a saved file holds; configs whose saved form has changed read older forms here."""
        return cls.from_dict(data)
