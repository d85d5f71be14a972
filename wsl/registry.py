"""Name -> builder registries, one per kind of component (backbones, poolings, segmenters, ...).

The CLI builds its ``choices=`` from ``names()`` so help text can never drift from the code.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional


class Registry:
    """A table of named builders for one kind of component."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: Dict[str, Callable[..., Any]] = {}

    def register(self, name: Optional[str] = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: register a class or function under ``name`` (default: its ``__name__``)."""

        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            key = name or fn.__name__
            if key in self._builders:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._builders[key] = fn
            return fn

        return decorator

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._builders[name]
        except KeyError:
            known = ", ".join(self.names()) or "(none)"
            raise ValueError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def build(self, name: str, /, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def names(self) -> List[str]:
        return sorted(self._builders)

    def __contains__(self, name: object) -> bool:
        return name in self._builders

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
