"""Lazy re-exports for the packages' ``__init__`` modules (PEP 562).

A package's ``__init__`` names what it exports and from which module, and
imports nothing: :func:`lazy_exports` returns the ``__getattr__`` that imports
the module the first time one of its names is read. So importing a package
never imports its modules, and the only import edges are those between
modules, which form a DAG (``tests/test_imports.py``).

Why not eager re-exports: in a Flower simulation the ServerApp and the
ClientApp are imported by two threads of one process. With an ``__init__``
that imports its modules, a thread entering the package through one module
(``hetkd.distill.losses``) while another runs the ``__init__`` (which imports
``hetkd.distill.similarity``, which imports ``losses``) can each hold an
import lock the other needs; Python then breaks the deadlock by handing one
of them a half-initialised module.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, Sequence[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package`` exporting ``exports`` (module -> names)."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # later reads skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__, sorted(where)
