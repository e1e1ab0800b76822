"""The pass registry names exactly the spec's step types, and each pass takes the form STEP_FORMS says."""

from __future__ import annotations

import subprocess
import sys
from typing import Literal

from models.spec import STEP_FORMS, step_types
from worker.passes import REGISTRY, _load_all


def test_registry_matches_spec() -> None:
    _load_all()
    assert sorted(REGISTRY) == step_types()
    for name, cls in REGISTRY.items():
        assert cls.name == name
        assert cls.takes == STEP_FORMS[name], name
        assert cls.__doc__ and len(cls.__doc__.strip()) > 20
        assert cls.params.model_fields["type"].annotation == Literal[name]


def test_pass_modules_import_without_torch() -> None:
    code = (
        "import sys; import worker.passes as p; p._load_all(); import worker.convert, worker.training; "
        "import worker.formats.hf, worker.formats.text, worker.formats.imagefolder; "
        "heavy = [m for m in ('torch', 'transformers', 'torch_pruning', 'onnx2torch', 'peft') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
