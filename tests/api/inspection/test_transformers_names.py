"""transformers' auto tables read from its source: the same names the imported package has, torch never loaded."""

from __future__ import annotations

import json
import subprocess
import sys

from api.inspection.transformers_names import _assigned_pairs, stock_tables


def test_the_parsed_tables_are_the_ones_transformers_imports() -> None:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    tables = stock_tables()
    assert tables is not None and tables.version == transformers.__version__
    assert {k: v[0] for k, v in tables.causal_lm.items()} == dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    assert set(CONFIG_MAPPING_NAMES) - tables.model_types <= {"gpt-sw3"}  # added by a dict merge, not a literal
    assert {"LlamaForCausalLM", "GPT2LMHeadModel", "Qwen2ForCausalLM"} <= tables.causal_classes
    assert "BertForSequenceClassification" not in tables.causal_classes


def test_reading_the_tables_imports_neither_transformers_nor_torch() -> None:
    code = ("import sys, json; from api.inspection.transformers_names import stock_tables; t = stock_tables(); "
            "print(json.dumps([len(t.causal_lm), 'torch' in sys.modules, 'transformers' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    count, torch_loaded, transformers_loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert count > 100 and not torch_loaded and not transformers_loaded


def test_pairs_with_several_classes_and_other_assignments() -> None:
    source = ("from collections import OrderedDict\nX = 1\n"
              "NAMES = OrderedDict([('a', 'A'), ('b', ('B1', 'B2'))])\nOTHER = OrderedDict([('c', 'C')])\n"
              "NAMES.update({'d': 'D'})\nOTHER.update({'e': 'E'})\n")
    assert _assigned_pairs(source, "NAMES") == {"a": ("A",), "b": ("B1", "B2"), "d": ("D",)}
    assert _assigned_pairs(source, "MISSING") == {}
