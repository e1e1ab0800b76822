"""The model types and causal-LM classes stock transformers builds, read from its auto tables without importing it.

``import transformers`` (even ``transformers.models.auto``) loads torch, which the API never does. The auto
tables (``CONFIG_MAPPING_NAMES``, ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``) are literal lists of name pairs in
transformers' source, so they are parsed with ``ast`` from the installed package. The API image may lack
transformers altogether: then :func:`stock_tables` is None and the worker, which builds the model with
``AutoModelForCausalLM``, is where an unknown architecture fails.
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

MAX_SOURCE_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class StockTables:
    """What the installed transformers ships: its version, config model types, causal-LM class per model type."""

    version: str
    model_types: frozenset[str]
    causal_lm: dict[str, tuple[str, ...]]

    @property
    def causal_classes(self) -> frozenset[str]:
        """Every class name ``AutoModelForCausalLM`` can build."""
        return frozenset(c for names in self.causal_lm.values() for c in names)


def _assigned_pairs(source: str, name: str) -> dict[str, tuple[str, ...]]:
    """The ``(key, value)`` pairs of ``name = OrderedDict([...])`` in ``source`` (values: one name or several)."""
    tree = ast.parse(source)
    out: dict[str, tuple[str, ...]] = {}
    for node in tree.body:
        items: list[tuple[object, object]] = []
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            call = node.value
            if isinstance(call, ast.Call) and call.args and isinstance(call.args[0], ast.List | ast.Tuple):
                items = [tuple(item) for item in ast.literal_eval(call.args[0])]
        elif (  # NAME.update({...}): the entries transformers adds by hand
            isinstance(node, ast.Expr)
            and isinstance(call := node.value, ast.Call)
            and isinstance(call.func, ast.Attribute)
            and call.func.attr == "update"
            and isinstance(call.func.value, ast.Name)
            and call.func.value.id == name
            and call.args
            and isinstance(call.args[0], ast.Dict)
        ):
            items = list(ast.literal_eval(call.args[0]).items())
        for key, value in items:
            out[str(key)] = (value,) if isinstance(value, str) else tuple(str(v) for v in value)  # type: ignore[attr-defined]
    return out


def _read(path: Path) -> str:
    if not path.is_file() or path.stat().st_size > MAX_SOURCE_BYTES:
        return ""
    return path.read_text(encoding="utf-8")


def _version(package: Path) -> str:
    for line in _read(package / "__init__.py").splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "?"


@lru_cache(maxsize=1)
def stock_tables() -> StockTables | None:
    """The installed transformers' tables (parsed once), or None when transformers is not installed."""
    spec = importlib.util.find_spec("transformers")  # a top-level find_spec imports nothing
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(next(iter(spec.submodule_search_locations)))
    auto = package / "models" / "auto"
    try:
        configs: dict[str, tuple[str, ...]] = {}
        for source in (_read(auto / "auto_mappings.py"), _read(auto / "configuration_auto.py")):
            if source:
                configs.update(_assigned_pairs(source, "CONFIG_MAPPING_NAMES"))
        causal = _assigned_pairs(_read(auto / "modeling_auto.py"), "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")
    except (SyntaxError, ValueError, TypeError):
        return None
    if not configs or not causal:
        return None
    return StockTables(version=_version(package), model_types=frozenset(configs), causal_lm=causal)
