"""One registry shape for everything found by name: models, attacks, defenses, method presets, modalities.

A :class:`Registry` is a dict from name to object with a ``register`` decorator and an error that
lists the choices, so every "unknown X" message reads the same::

    MODELS = Registry("model")

    @MODELS.register("wrn16_1")
    def wrn16_1(num_classes: int, **kw) -> nn.Module: ...

    MODELS.get_or_raise("wrn16_1")
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

from smoothpurify import SmoothPurifyError

T = TypeVar("T")


class Registry(dict):
    def __init__(self, kind: str, entries: dict[str, Any] | None = None,
                 descriptions: dict[str, str] | None = None):
        super().__init__(entries or {})
        self.kind = kind
        self.descriptions: dict[str, str] = dict(descriptions or {})

    def register(self, name: str | None = None, description: str | None = None) -> Callable[[T], T]:
        """Decorator: register the object under ``name`` (default: its ``name`` attribute or ``__name__``)."""
        def add(obj: T) -> T:
            key = name or getattr(obj, "name", None) or obj.__name__
            if key in self:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self[key] = obj
            if description:
                self.descriptions[key] = description
            return obj
        return add

    def describe(self, name: str) -> str:
        """One line for listings: the registered description, else the first line of the docstring."""
        if name in self.descriptions:
            return self.descriptions[name]
        doc = (getattr(self.get(name), "__doc__", None) or "").strip()
        first = doc.split("\n\n", 1)[0].replace("\n", " ")
        return " ".join(first.split()) if doc and not isinstance(self.get(name), (dict, str)) else ""

    def names(self) -> list[str]:
        return list(self)

    def get_or_raise(self, name: str, extra: list[str] | None = None) -> Any:
        """The entry ``name``, or one :class:`SmoothPurifyError` line listing the choices."""
        if name not in self:
            choices = [*self, *(extra or [])]
            raise SmoothPurifyError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(choices)}")
        return self[name]
