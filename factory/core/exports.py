"""Public names of a package, imported from their modules on first use.

Each package's ``__init__.py`` names its public API; importing the package (or one light name
of it) must not import torch, diffusers or Ray for the names nobody asked for: the jobs answer
``--help`` and refuse bad input before any of those load.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, modules: dict[str, tuple[str, ...]]) -> tuple[list[str], Callable[[str], Any]]:
    """``__all__`` and a module ``__getattr__`` for `package`, whose module M exports the names
    ``modules[M]``."""
    home = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{home[name]}"), name)

    return sorted(home), __getattr__
