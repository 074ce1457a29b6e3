"""One registry idiom for every plug-in kind (pairing policies, KV transports, expert cache
policies, sequence-parallel schedules, model architectures).

A kind's registry is one table, name -> "module:attribute", declared in a torch-free module. The
table is the one list of that kind's names: configs check against it and the Helm schema lists
it, without importing anything; the plug-in's module is imported only when `get` asks for it, so
a router that merely validates `kv_transfer.transport` never pays for torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")

# Dataclass field metadata key: the values a `str` config field accepts (schema.py checks them,
# kube_schema.py lists them as the field's enum).
CHOICES = "choices"


class Registry(Generic[T]):
    """The plug-ins of one kind by name, each imported on first use."""

    def __init__(
        self,
        kind: str,
        setting: str,
        package: str,
        entries: Mapping[str, str],
        error: type[ValueError] = ValueError,
    ) -> None:
        """`entries`: name -> "module:attribute", the module relative to `package`.

        `setting` is the config field that names a plug-in of this kind (errors start with it);
        `error` is the exception raised for an unknown name.
        """
        self.kind = kind
        self.setting = setting
        self.package = package
        self._entries = dict(entries)
        self._error = error
        self._loaded: dict[str, T] = {}

    def names(self) -> tuple[str, ...]:
        """Every registered name, in declaration order."""
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def check(self, name: str) -> None:
        """Raise the registry's error, naming the setting and the known names, if `name` is unknown."""
        if name not in self._entries:
            raise self._error(
                f"{self.setting}: unknown {self.kind} {name!r}; choose one of {list(self._entries)}"
            )

    def get(self, name: str) -> T:
        """The plug-in registered as `name` (its module is imported now, once)."""
        self.check(name)
        if name not in self._loaded:
            module, _, attr = self._entries[name].partition(":")
            mod = importlib.import_module(f"{self.package}.{module}")
            self._loaded[name] = getattr(mod, attr)
        return self._loaded[name]


def choices(names: Iterable[str]) -> dict[str, Any]:
    """Field metadata restricting a `str` config field to `names` (one definition: a registry's)."""
    return {CHOICES: tuple(names)}


__all__ = ["CHOICES", "Registry", "choices"]
