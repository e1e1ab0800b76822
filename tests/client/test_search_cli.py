"""``modelpress optimize --auto``: the search spec it submits and the trial lines it streams."""

from __future__ import annotations

import json

from client.search_cli import build_search_spec, trial_line
from models.report import Trial
from models.spec import JobSpec
from tests.client.test_cli import mp
from tests.e2e.harness import free_port


def test_auto_dry_run_prints_a_valid_search_spec() -> None:
    out = mp("--url", f"http://127.0.0.1:{free_port()}", "optimize", "m.onnx", "--data", "train.npz,eval.npz",
             "--auto", "--max-accuracy-drop", "0.01", "--objective", "size", "--max-trials", "4", "--out", "x",
             "--dry-run", check=0)
    spec = JobSpec.model_validate(json.loads(out.stdout))
    assert spec.steps == [] and spec.search is not None
    assert spec.search.space == "auto" and spec.search.objective == "size"
    assert spec.search.constraints.max_accuracy_drop == 0.01 and spec.search.budget.max_trials == 4
    assert spec.data.train == "<upload:train.npz>" and spec.data.eval == "<upload:eval.npz>"


def test_a_constraint_without_eval_data_is_refused_before_submitting() -> None:
    spec = build_search_spec("m", {}, max_accuracy_drop=0.01)
    bad = mp("--url", f"http://127.0.0.1:{free_port()}", "optimize", "m.onnx", "--auto", "--max-accuracy-drop",
             "0.01", "--out", "x", "--dry-run", check=2)
    assert "search.constraints.max_accuracy_drop" in bad.stderr
    assert spec["search"]["constraints"] == {"max_accuracy_drop": 0.01}


def test_trial_lines() -> None:
    done = trial_line(Trial.model_validate({"index": 1, "label": "quantize dynamic", "state": "succeeded",
                                            "metric": 0.9611, "size_bytes": 25_000, "latency_ms": 0.0412, "met": True}))
    assert done == "trial 1: quantize dynamic — succeeded: metric 0.9611, size 0.025 MB, latency 0.0412 ms"
    missed = trial_line(Trial.model_validate({"index": 3, "label": "prune 0.95", "state": "failed", "metric": 0.2,
                                              "met": False, "misses": ["quality: accuracy drop 0.76 > 0.02"]}))
    assert missed.endswith("(misses: quality: accuracy drop 0.76 > 0.02)") and "size - MB" not in missed
    skipped = trial_line(Trial.model_validate({"index": 2, "label": "quantize fp16", "state": "skipped",
                                               "reason": "cannot beat the best"}))
    assert skipped == "trial 2: quantize fp16 — skipped (cannot beat the best)"


def test_the_task_comes_from_the_uploads_inspection_and_every_constraint_is_sent() -> None:
    lm_meta = {"task": "text-generation", "architecture": "LlamaForCausalLM", "layers": 2}
    spec = JobSpec.model_validate(build_search_spec("m", {"eval": "e"}, objective="size", max_perplexity_increase=0.05,
                                                    max_trials=4, model_meta=lm_meta))
    assert spec.task == "text-generation"  # not "generic": the LM space, with its INT4 trials
    assert spec.search is not None and spec.search.constraints.max_perplexity_increase == 0.05
    given = build_search_spec("m", {"eval": "e"}, task="feature-extraction", model_meta=lm_meta, min_fidelity=0.99,
                              latency={"threads": 2})
    assert given["task"] == "feature-extraction" and given["search"]["constraints"] == {"min_fidelity": 0.99}
    assert given["evaluate"] == {"latency": {"threads": 2}}
    assert "task" not in build_search_spec("m", {}, model_meta={"op_types": {"Conv": 3}})  # ONNX: no task known
    out = mp("--url", f"http://127.0.0.1:{free_port()}", "optimize", "m.zip", "--eval", "eval.jsonl", "--auto",
             "--objective", "size", "--max-perplexity-increase", "0.05", "--min-fidelity", "0.9", "--out", "x",
             "--dry-run", check=0)
    constraints = json.loads(out.stdout)["search"]["constraints"]
    assert constraints == {"max_perplexity_increase": 0.05, "min_fidelity": 0.9}
