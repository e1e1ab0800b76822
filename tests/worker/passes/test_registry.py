"""The pass registry names exactly the spec's step types; each pass takes the form and model STEP_KINDS says."""

from __future__ import annotations

import subprocess
import sys
from typing import Any, Literal

import pytest

from models.spec import STEP_KINDS, PruneStep, TrainingParams, step_types
from worker.core import PassContext, WorkingModel
from worker.passes import REGISTRY, load_passes
from worker.passes.base import Pass, PassResult


def test_registry_matches_spec() -> None:
    passes = load_passes()
    assert sorted(passes) == step_types()
    for name, cls in passes.items():
        kind = STEP_KINDS[name]
        assert cls.name == name
        assert cls.takes == kind.takes, name
        assert cls.params is kind.params, name
        assert cls.__doc__ and len(cls.__doc__.strip()) > 20
        assert cls.params.model_fields["type"].annotation == Literal[name]


def test_training_flags_agree_with_the_forms() -> None:
    """A step that trains or wants the GPU works on the torch module; a training step wants the GPU."""
    for name, kind in STEP_KINDS.items():
        assert not (kind.trains or kind.gpu) or kind.takes == "torch", name
        assert not kind.trains or kind.gpu, name
        assert kind.trains == issubclass(kind.params, TrainingParams), name  # trainers take loop settings
    assert {n for n, k in STEP_KINDS.items() if k.trains} == {"finetune", "distill"}
    assert {n for n, k in STEP_KINDS.items() if k.gpu} == {"prune", "finetune", "distill"}


class _Run:
    def run(self, model: WorkingModel, params: Any, ctx: PassContext) -> PassResult:
        return PassResult(model)


def test_a_pass_takes_params_and_form_from_the_table_and_registers_itself() -> None:
    class Double(_Run, Pass, register=False):
        name = "prune"

    assert Double.params is PruneStep and Double.takes == "torch"
    assert REGISTRY.get("prune") is not Double  # register=False kept it out


def test_a_pass_that_disagrees_with_the_table_is_refused() -> None:
    with pytest.raises(TypeError, match="STEP_KINDS says 'torch'"):
        class WrongForm(_Run, Pass, register=False):
            name = "prune"
            takes = "onnx"

    with pytest.raises(TypeError, match="no step type 'bogus'"):
        class Unknown(_Run, Pass, register=False):
            name = "bogus"

    load_passes()
    with pytest.raises(TypeError, match="already"):
        class Second(_Run, Pass):
            name = "quantize"
    assert REGISTRY["quantize"].__name__ == "QuantizePass"


def test_pass_modules_import_without_torch() -> None:
    code = (
        "import sys; import worker.passes as p; p.load_passes(); "
        "import worker.convert, worker.training, worker.torch_utils, worker.metrics, worker.context; "
        "import worker.formats.hf, worker.formats.text, worker.formats.imagefolder; "
        "heavy = [m for m in ('torch', 'transformers', 'torch_pruning', 'onnx2torch', 'peft') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
