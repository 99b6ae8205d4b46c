"""One name -> entry registry for every qlab registry (formats, GGUF block formats, KV formats, weight layouts,
runtimes): entries are added explicitly, a name is registered once, lookups fold case and follow aliases, and an
unknown name is one ``QlabError`` line that lists the registered ones."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from qlab.core.errors import QlabError

Entry = TypeVar("Entry")


class Registry(Generic[Entry]):
    """Entries by name, in registration order (the order pages offer them)."""

    def __init__(self, what: str, fold: Callable[[str], str] = str.lower, choose: str = "choose one of") -> None:
        self.what, self.fold, self.choose = what, fold, choose
        self.entries: dict[str, Entry] = {}
        self.aliases: dict[str, str] = {}

    def register(self, entry: Entry, *aliases: str) -> Entry:
        """Add an entry under its ``name`` (and any aliases); a second entry of the same name is a bug."""
        name = entry.name  # type: ignore[attr-defined]
        if name in self.entries:
            raise ValueError(f"{self.what} {name} registered twice")
        self.entries[name] = entry
        self.aliases.update(dict.fromkeys(aliases, name))
        return entry

    def get(self, name: str) -> Entry:
        """The entry registered under ``name`` or one of its aliases, case folded."""
        key = self.fold(str(name).strip())
        key = self.aliases.get(key, key)
        if key not in self.entries:
            raise QlabError(f"unknown {self.what} '{name}'; {self.choose} {', '.join(self.entries)}.")
        return self.entries[key]

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self.entries)
