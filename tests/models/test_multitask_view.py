"""The multi-task rows every view shows: each task's before/after on its own eval rows, few-shot columns, and the
shared model's size against N separate models; the per-task curve series; the CLI table of the same rows."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from client.render import tasks_table
from models.multitask_view import size_text, task_rows
from models.report_view import step_rows


def multitask_report() -> dict[str, Any]:
    """A report of one multi-task finetune step as the worker stores it (numbers from a digits run)."""
    return {
        "task": "image-classification", "input": {}, "output": {},
        "steps": [{
            "index": 0, "type": "finetune", "label": "finetune (full, 2 tasks)", "wall_s": 12.5,
            "metrics": {"mode": "full", "multitask": {
                "sampling": "temperature", "temperature": 2.0,
                "tasks": [
                    {"task": "parity", "metric": "accuracy", "before": 0.5176, "after": 0.9481, "train_rows": 1200,
                     "eval_rows": 597, "validation_rows": None, "few_shot": False},
                    {"task": "high", "metric": "accuracy", "before": 0.4405, "after": 0.6918, "train_rows": 24,
                     "eval_rows": 597, "validation_rows": 8, "few_shot": True},
                    {"task": "which", "metric": "accuracy", "before": 0.5, "after": 0.8, "train_rows": 16,
                     "validation_rows": 4, "eval_rows": 40, "few_shot": True, "zero_shot": 0.5,
                     "in_context": 0.55, "fine_tuned": 0.8},
                ],
                "size": {"tasks": 3, "shared_params": 14510, "separate_params": 42606, "ratio": 0.3406,
                         "shared_bytes": 62590, "separate_bytes": 183784},
            }},
            "curve": [{"epoch": 1, "loss": 0.9, "loss[parity]": 0.7, "accuracy[parity]": 0.8},
                      {"epoch": 2, "loss": 0.5, "loss[parity]": 0.3, "accuracy[parity]": 0.95}],
        }],
    }


def test_task_rows_and_size() -> None:
    rows = task_rows(multitask_report())
    assert [(r.task, r.before_text, r.after_text, r.change_text, r.better) for r in rows] == [
        ("parity", "51.8%", "94.8%", "+43.1 points", True),
        ("high", "44.0%", "69.2%", "+25.1 points", True),
        ("which", "50.0%", "80.0%", "+30.0 points", True),
    ]
    assert rows[1].rows_text == "24 train, 8 validation (carved from train), 597 eval"
    assert (rows[2].zero_shot_text, rows[2].in_context_text, rows[2].fine_tuned_text) == ("50.0%", "55.0%", "80.0%")
    assert rows[1].fine_tuned_text == "69.2%" and rows[1].zero_shot_text == "-"
    text = size_text(multitask_report())
    assert "one model of 14,510 parameters (61.12 KB) serves 3 tasks" in text
    assert "42,606 parameters (179.48 KB), 0.34x of their size; batches drawn temperature (T=2)" in text
    assert task_rows({"steps": [{"metrics": {"mode": "full"}}]}) == [] and size_text({}) == ""


def test_per_task_curve_series_are_charted() -> None:
    (step,) = step_rows(multitask_report())
    assert list(step.curves) == ["loss", "loss[parity]", "accuracy[parity]"]
    assert step.curves["accuracy[parity]"] == [(1, 0.8), (2, 0.95)]


def _printed(report: dict[str, Any]) -> str:
    """The CLI's tasks table of ``report`` as text."""
    console = Console(width=200, record=True)
    table = tasks_table(report)
    assert table is not None
    console.print(table)
    return console.export_text()


def test_cli_tasks_table() -> None:
    out = _printed(multitask_report())
    assert "zero-shot" in out and "in-context" in out and "+43.1 points" in out and "0.34x" in out
    assert tasks_table({"steps": []}) is None


def merge_report() -> dict[str, Any]:
    """A report of an adapters-merge step as the worker stores it (numbers from a tiny BERT run)."""
    report = multitask_report()
    report["steps"][0]["metrics"]["multitask"]["merge"] = {
        "chosen": "linear", "why": "linear: highest mean validation accuracy over the tasks (84.8%)",
        "individual": {"topic": {"validation": 0.8718}, "food": {"validation": 1.0}},
        "methods": [
            {"method": "linear", "density": None, "per_task": {"topic": 0.8718, "food": 0.825}, "mean": 0.8484},
            {"method": "ties", "density": 0.5, "per_task": {"topic": 0.5897, "food": 0.775}, "mean": 0.6824},
            {"method": "cat", "error": "All adapters must have the same r value " + "x" * 200},
        ],
    }
    return report


def test_merge_view_and_cli_table() -> None:
    from client.render import merge_table
    from models.multitask_view import merge_view

    view = merge_view(merge_report())
    assert view is not None and view.tasks == ["topic", "food"] and view.chosen == "linear"
    assert view.rows == [
        ("each task's adapter alone", ["87.2%", "100.0%"], "-", False),
        ("linear", ["87.2%", "82.5%"], "84.8%", True),
        ("ties (density 0.5)", ["59.0%", "77.5%"], "68.2%", False),
        ("cat", ["-", "-"], "not possible: All adapters must have the same r value " + "x" * 40, False),  # cut at 80 characters
    ]
    assert merge_view(multitask_report()) is None
    console = Console(width=160, record=True)
    table = merge_table(merge_report())
    assert table is not None
    console.print(table)
    out = console.export_text()
    assert "linear *" in out and "84.8%" in out and "chosen: linear: highest mean" in out


def test_an_lm_merge_shows_eval_loss_as_numbers() -> None:
    from models.multitask_view import merge_view

    report = merge_report()
    merge = report["steps"][0]["metrics"]["multitask"]["merge"]
    merge.update({"metric": "eval_loss", "individual": {"lm": {"validation": 5.8614, "validation_before": 5.95}},
                  "methods": [{"method": "cat", "density": None, "per_task": {"lm": 5.8613}, "mean": 5.8613}]})
    view = merge_view(report)
    assert view is not None and view.metric == "eval loss"
    assert view.rows == [("input model", ["5.95"], "-", False), ("each task's adapter alone", ["5.861"], "-", False),
                         ("cat", ["5.861"], "5.861", False)]
    assert view.adapter_files is None
    merge["adapter_files"] = {"base_bytes": 1_258_291, "base_load_s": 0.07, "adapter_bytes": {"lm": 29_144},
                              "runs": [{"adapter": "lm", "matches_torch": True}, {"adapter": None, "matches_torch": True}]}
    view = merge_view(report)
    assert view is not None and view.adapter_files == (
        "adapters.zip: base 1.20 MB loaded once (0.07 s), one adapter file per task (lm 28.46 KB); 2 runs switching "
        "adapters on that one model generated torch's tokens with each")
    merge["adapter_files"]["runs"][1]["matches_torch"] = False
    assert "did NOT all match torch" in str(merge_view(report).adapter_files)  # type: ignore[union-attr]


def baselines_report() -> dict[str, Any]:
    """The multi-task report with single-task baselines set beside two of its tasks (one from the cache, one failed)."""
    report = multitask_report()
    mt = report["steps"][0]["metrics"]["multitask"]
    mt["tasks"][0].update(single_task=0.9313, vs_single_task=0.0168, single_task_cached=True)
    mt["tasks"][1].update(single_task=0.7, vs_single_task=-0.0082, single_task_cached=False)
    mt["tasks"][2].update(single_task=None, vs_single_task=None, single_task_error="out of memory")
    mt["baselines"] = {"kind": "single_task", "jobs": [{"task": "parity", "cached": True}, {"task": "high"},
                                                       {"task": "which"}],
                       "separate_bytes": 183784, "shared_bytes": 62590, "ratio": 0.3406}
    return report


def test_single_task_baselines_beside_each_task() -> None:
    from models.multitask_view import baselines_text

    rows = task_rows(baselines_report())
    assert [(r.single_task_text, r.vs_single_text, r.vs_single_better) for r in rows] == [
        ("93.1% (cached)", "+1.7 points", True), ("70.0%", "-0.8 points", False), ("failed", "-", None)]
    assert all(r.single_task_text == "" for r in task_rows(multitask_report()))  # none asked: no column
    assert baselines_text(baselines_report()) == (
        "single-task baselines: 3 fine-tunes of the same budget (1 from the cache); their 3 models 179.48 KB, "
        "this one 61.12 KB, 0.34x of their size")
    out = _printed(baselines_report())
    assert "single-task" in out and "vs single" in out and "93.1% (cached)" in out and "+1.7 points" in out
    assert "vs single" not in _printed(multitask_report())


def test_the_output_and_the_budget_per_task() -> None:
    """After a quantize step: each task's accuracy through its own output and its drop against its reference."""
    report = {**multitask_report(), "output": {"tasks": [
        {"task": "parity", "output": "logits_parity", "accuracy": 0.93, "eval_rows": 597},
        {"task": "high", "output": "logits_high", "accuracy": 0.6918, "eval_rows": 597}]},
        "budget": {"met": False, "max_accuracy_drop": 0.01, "accuracy_drop": 0.0181, "task": "parity", "tasks": [
            {"task": "parity", "reference": 0.9481, "reference_from": "steps.0 (finetune (full, 2 tasks))",
             "accuracy": 0.93, "accuracy_drop": 0.0181, "met": False},
            {"task": "high", "reference": 0.6918, "reference_from": "input", "accuracy": 0.6918,
             "accuracy_drop": 0.0, "met": True}]}}
    rows = {r.task: r for r in task_rows(report)}
    assert rows["parity"].output_text == "93.0%" and not rows["parity"].budget_met
    assert rows["parity"].budget_text == "-1.8 points vs steps.0 (finetune (full, 2 tasks)) (over 1.0)"
    assert rows["high"].budget_met and rows["high"].budget_text == "+0.0 points vs input (within 1.0)"
    assert rows["which"].output_text == "" and task_rows(multitask_report())[0].output_text == ""
    out = _printed(report)
    assert "output" in out and "(over 1.0)" in out
