"""The API starts without torch or onnxruntime (docs/architecture.md §2)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_import_api_main_does_not_import_torch() -> None:
    code = (
        "import sys, json, api.main; "
        "print(json.dumps({m: m in sys.modules for m in ('torch', 'onnxruntime', 'transformers', 'onnx')}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == {"torch": False, "onnxruntime": False, "transformers": False, "onnx": False}
