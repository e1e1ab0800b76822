"""The passes: one module per optimization; each ``Pass`` subclass registers itself under its ``name``.

Pass modules import torch only inside ``run()``, so loading them all is cheap.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from worker.passes.base import REGISTRY, Pass, PassResult


@functools.cache
def load_passes() -> dict[str, type[Pass]]:
    """Every registered pass by step type (importing each module of this package registers its passes)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return REGISTRY


__all__ = ["REGISTRY", "Pass", "PassResult", "load_passes"]
