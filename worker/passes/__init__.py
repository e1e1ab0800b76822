"""Pass registry: step type -> Pass class. Each pass lives in its own module and imports torch lazily."""

from __future__ import annotations

from worker.passes.base import Pass, PassContext, PassResult, StepFailed, WorkingModel

REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator adding a pass to the registry under its ``name``."""
    REGISTRY[cls.name] = cls
    return cls


def get_pass(name: str) -> Pass:
    """An instance of the pass registered under ``name``."""
    _load_all()
    return REGISTRY[name]()


def _load_all() -> None:
    # Importing a pass module registers it; the modules themselves import torch only inside run().
    from worker.passes import distill, export, finetune, prune, quantize  # noqa: F401


__all__ = ["REGISTRY", "Pass", "PassContext", "PassResult", "StepFailed", "WorkingModel", "get_pass", "register"]
