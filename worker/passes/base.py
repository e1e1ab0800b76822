"""The uniform pass interface: a pass takes the working model in one form and returns a new one.

The types a pass works with (``WorkingModel``, ``PassContext``, ``StepFailed`` ...) live in ``worker.core``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from models.spec import STEP_KINDS, Form, StepParams
from worker.core import PassContext, WorkingModel


@dataclass
class PassResult:
    """What a pass returns: the new working model, scalar metrics, an optional per-epoch curve, and files the job
    delivers beside its model by artifact name (e.g. ``adapters.zip``)."""

    model: WorkingModel
    metrics: dict[str, Any] = field(default_factory=dict)
    curve: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)



REGISTRY: dict[str, type[Pass]] = {}


class Pass(ABC):
    """One optimization, registered under its ``name`` (a step type of models.spec.STEP_KINDS) when defined.

    ``params`` (its step model) and ``takes`` (its input form) come from that table row; a subclass that
    sets them must agree with it. ``class Double(Pass, register=False)`` defines one without registering
    it (a test double).
    """

    name: ClassVar[str]
    params: ClassVar[type[StepParams]]
    takes: ClassVar[Form]

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is None:
            return  # an intermediate base
        kind = STEP_KINDS.get(name)
        if kind is None:
            raise TypeError(f"{cls.__qualname__}: no step type {name!r} in models.spec.STEP_KINDS")
        for attr, value in (("params", kind.params), ("takes", kind.takes)):
            if attr in cls.__dict__ and cls.__dict__[attr] != value:
                raise TypeError(f"{cls.__qualname__}.{attr} = {cls.__dict__[attr]!r} but STEP_KINDS says {value!r}")
            setattr(cls, attr, value)
        if register:
            # the same class defined again (its module reloaded) replaces itself; another class is refused
            if name in REGISTRY and REGISTRY[name].__qualname__ != cls.__qualname__:
                raise TypeError(f"{cls.__qualname__}: pass {name!r} is already {REGISTRY[name].__qualname__}")
            REGISTRY[name] = cls

    @abstractmethod
    def run(self, model: WorkingModel, params: Any, ctx: PassContext) -> PassResult:
        """Apply the pass to ``model`` and return the new working model."""


