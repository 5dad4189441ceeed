"""One small generic registry: methods, benches, text sources, model families, zoo models and report views are
each a `Registry`, so every lookup refuses an unknown name the same way, with the closest names and the list."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from suite.errors import ConfigError, PruneBenchError, did_you_mean

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """name -> T, filled by `add` or the `register(name)` decorator, iterated in registration order; `discover`
    (optional) is called once before the first lookup, to import whatever registers entries (method packages,
    plugins)."""

    def __init__(self, what: str, error: type[PruneBenchError] = ConfigError,
                 discover: Callable[[], None] | None = None) -> None:
        self.what = what  # "method", "bench", ...: how an error names an entry
        self.error = error
        self._entries: dict[str, T] = {}
        self._discover = discover

    def add(self, name: str, entry: T) -> T:
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"{self.what} {name!r} registered twice")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of `add`."""
        return lambda entry: self.add(name, entry)

    def _ready(self) -> dict[str, T]:
        if self._discover is not None:
            discover, self._discover = self._discover, None
            try:
                discover()
            except BaseException:
                self._discover = discover  # not discovered: the next lookup tries again
                raise
        return self._entries

    def __getitem__(self, name: str) -> T:
        entries = self._ready()
        if name not in entries:
            raise self.error(f"unknown {self.what} {name!r}{did_you_mean(name, entries)} "
                             f"(available: {', '.join(sorted(entries))})")
        return entries[name]

    def get(self, name: str, default: T | None = None) -> T | None:  # type: ignore[override]
        """The entry, or `default` without an error (a lookup that has a fallback)."""
        return self._ready().get(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self._ready()

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._ready()))

    def __len__(self) -> int:
        return len(self._ready())
