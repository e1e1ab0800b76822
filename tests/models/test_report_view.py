"""models.report_view: the before/after rows, budget, gains and steps a person reads, from a report dict."""

from __future__ import annotations

from models import report_view as rv
from tests.api.report_samples import sample_report

X = rv.TIMES


def test_comparison_rows_of_a_full_report() -> None:
    rows = {r.key: r for r in rv.comparison_rows(sample_report())}
    assert list(rows) == ["size_bytes", "latency_ms", "latency_p90", "latency_mean", "params", "macs", "accuracy"]
    size = rows["size_bytes"]
    assert (size.before_text, size.after_text, size.change_text, size.better) == ("44.00 MB", "5.62 MB", f"7.83{X} smaller", True)
    assert (size.before, size.after) == (46_137_344, 5_890_113)
    lat = rows["latency_ms"]
    assert (lat.label, lat.before_text, lat.after_text, lat.change_text) == ("latency median (ms)", "23.4", "7.8", f"3.00{X} faster")
    assert rows["latency_p90"].change_text == f"2.92{X} faster"
    assert rows["params"].before_text == "11,689,512" and rows["params"].change_text == f"1.99{X} fewer"
    acc = rows["accuracy"]
    assert acc.label == "accuracy (image-classification)"
    assert (acc.before_text, acc.after_text, acc.change_text, acc.better) == ("0.9312", "0.9247", "-0.0065", False)


def test_comparison_rows_of_partial_and_old_reports() -> None:
    rows = rv.comparison_rows({"input": {"size_bytes": 1000, "latency_ms": 4.0}, "output": {"size_bytes": 250}})
    assert [r.key for r in rows] == ["size_bytes", "latency_ms", "params"]  # no p90/mean, MACs or accuracy
    assert rows[0].change_text == f"4.00{X} smaller" and rows[0].before_text == "1000 B"
    assert (rows[1].before_text, rows[1].after_text, rows[1].change_text, rows[1].better) == ("4", "-", "-", None)
    slower = rv.comparison_rows({"input": {"latency_ms": {"median": 2.0}}, "output": {"latency_ms": {"median": 3.0}}})
    assert slower[1].better is False and slower[1].change_text == f"1.50{X} slower"
    assert rv.comparison_rows({"input": {"size_bytes": 10}, "output": {"size_bytes": 0}})[0].change_text == "-"
    same = rv.comparison_rows({"input": {"params": 1000, "size_bytes": 100}, "output": {"params": 1000, "size_bytes": 104}})
    assert {r.key: (r.change_text, r.better) for r in same}["params"] == ("same", None)  # quantization keeps them
    assert same[0].change_text == f"1.04{X} larger" and same[0].better is False


def test_perplexity_changes_in_percent_and_memory_in_words() -> None:
    from tests.api.report_samples import lm_report

    rows = {r.key: r for r in rv.comparison_rows(lm_report())}
    assert (rows["perplexity"].change_text, rows["perplexity"].better) == ("+4.51 %", False)  # 12.41 -> 12.97
    assert rows["peak_memory_bytes"].change_text.endswith(" less") and rows["peak_memory_bytes"].better
    int4 = lm_report()
    int4["gains"]["params_ratio"] = 1.0
    assert "fewer parameters" not in [g.word for g in rv.gains(int4)]


def test_formatters() -> None:
    assert rv.fmt_number(None) == "-" and rv.fmt_number(True) == "yes" and rv.fmt_number(1234567) == "1,234,567"
    assert rv.fmt_number(0.123456) == "0.1235" and rv.fmt_number(2.5e7) == "25,000,000"
    assert rv.fmt_number(float("nan")) == "nan" and rv.fmt_number("<b>") == "<b>"  # templates escape, not this
    assert [rv.fmt_bytes(n) for n in (512, 2048, 3 * 1024**2, 5 * 1024**3, None)] == [
        "512 B", "2.00 KB", "3.00 MB", "5.00 GB", "-"]
    assert not rv.is_num(True) and not rv.is_num(float("inf")) and rv.is_num(3)


def test_quality_rows() -> None:
    rows = rv.quality_rows(sample_report())
    assert [(r.label, r.value_text, r.better) for r in rows] == [
        ("accuracy budget (max drop 0.01)", "met", True),
        ("fidelity: max abs error", "0.0312", None),
        ("fidelity: cosine similarity", "0.99871", None),
        ("fidelity: top-1 agreement", "0.9861", None),
    ]
    missed = rv.quality_rows({"budget": {"max_accuracy_drop": 0.001, "met": False}})
    assert [(r.value_text, r.better) for r in missed] == [("missed", False)]
    assert rv.quality_rows({}) == []


def test_pipeline_labels_from_the_report_else_from_the_step_table() -> None:
    spec = {"steps": [{"type": "prune", "method": "unstructured", "ratio": 0.5}, {"type": "quantize"}]}
    assert rv.pipeline_labels({}, spec) == ["prune (unstructured 0.5)", "quantize (dynamic)"]
    assert rv.pipeline_labels(sample_report(), spec) == ["prune structured 0.5", "distill 4 ep", "quantize dynamic"]


def test_gains() -> None:
    gains = rv.gains(sample_report())
    assert [(g.value_text, g.word, g.better) for g in gains] == [
        (f"7.83{X}", "smaller", None), (f"3.00{X}", "faster", None), (f"1.99{X}", "fewer parameters", None),
        ("-0.0065", "accuracy", False),
    ]
    assert rv.gains({"gains": "nonsense"}) == [] and rv.gains({}) == []


def test_step_rows_with_curves() -> None:
    steps = rv.step_rows(sample_report())
    assert [(s.index_text, s.label, s.wall_text) for s in steps] == [
        ("0", "prune structured 0.5", "3.2"), ("1", "distill 4 ep", "61.7"), ("2", "quantize dynamic", "1.4")]
    assert steps[0].metrics_text == "params_removed=5,818,276" and steps[0].curves == {}
    assert list(steps[1].curves) == ["loss", "eval_metric", "lr"]
    assert steps[1].curves["loss"] == [(1, 1.92), (2, 1.11), (3, 0.74), (4, 0.61)]
    assert rv.step_rows({"steps": ["junk", {"type": "export"}]})[0].label == "export"


def test_regressions_warn_beyond_the_noise_margin_and_read_as_people_do() -> None:
    base = {"latency_ms": {"median": 0.27}, "size_bytes": 1000}
    slower = rv.regressions(base, {"latency_ms": {"median": 0.864}, "size_bytes": 2500})
    assert [w["code"] for w in slower] == ["slower_than_input", "larger_than_input"]
    assert slower[0]["ratio"] == 3.2 and slower[1]["ratio"] == 2.5
    assert slower[0]["message"] == "3.2\u00d7 slower than the input model (0.27 \u2192 0.864 ms median)"
    assert slower[1]["message"].startswith("2.50\u00d7 larger than the input model")
    # 4% slower is within the latency noise margin; 6% is not.
    assert rv.regressions(base, {"latency_ms": {"median": 0.27 * 1.04}, "size_bytes": 400}) == []
    assert [w["code"] for w in rv.regressions(base, {"latency_ms": {"median": 0.27 * 1.06}})] == ["slower_than_input"]
    assert rv.warning_lines({"input": base, "output": {"latency_ms": {"median": 0.864}}}) == [slower[0]["message"]]
    assert rv.warning_lines({"report": {"warnings": slower}}) == [w["message"] for w in slower]


def test_slower_is_warned_only_beyond_the_measured_spread() -> None:
    base = {"latency_ms": {"median": 0.27, "p90": 0.90}}
    # The INT4 case: a prefill median 1.53x slower while its p90 is 2.32x faster is noise, not a regression.
    assert rv.regressions(base, {"latency_ms": {"median": 0.27 * 1.53, "p90": 0.90 / 2.32}}) == []
    # slower median but still inside the input's spread (below its p90): no warning
    assert rv.regressions(base, {"latency_ms": {"median": 0.5, "p90": 1.2}}) == []
    # beyond it on both: warned, with both figures, and an LM's latency says it is prefill
    found = rv.regressions(base, {"latency_ms": {"median": 1.0, "p90": 1.5},
                                  "latency_setup": {"what": "prefill"}})
    assert [w["code"] for w in found] == ["slower_than_input"]
    assert found[0]["message"] == ("prefill 3.7\u00d7 slower than the input model "
                                   "(0.27 \u2192 1 ms median, 0.9 \u2192 1.5 ms p90)")
    # the interleaved recheck, when the worker made one, decides over the first figures
    rechecked = rv.regressions({**base, "latency_recheck": {"median": 0.3, "p90": 0.32}},
                               {"latency_ms": {"median": 1.0, "p90": 1.5},
                                "latency_recheck": {"median": 0.31, "p90": 0.33}})
    assert rechecked == []
    confirmed = rv.regressions({**base, "latency_recheck": {"median": 0.3, "p90": 0.32}},
                               {"latency_ms": {"median": 1.0}, "latency_recheck": {"median": 0.6, "p90": 0.65}})
    assert confirmed[0]["ratio"] == 2.0 and "timed again interleaved" in confirmed[0]["message"]
    # decode: overlapping rechecked ranges are noise (LoRA left the architecture alone), disjoint ones are not
    side = {"decode": {"tokens_per_s": 1700.0}}
    lora = {"decode": {"tokens_per_s": 1000.0}, "decode_recheck": {"tokens_per_s": 1650.0, "min": 1500.0, "max": 1800.0}}
    assert rv.regressions({**side, "decode_recheck": {"tokens_per_s": 1690.0, "min": 1550.0, "max": 1750.0}},
                          lora) == []
    slow = {"decode_recheck": {"tokens_per_s": 800.0, "min": 700.0, "max": 900.0}}
    assert [w["code"] for w in rv.regressions({**side, "decode_recheck": {"tokens_per_s": 1690.0, "min": 1550.0,
                                                                          "max": 1750.0}}, slow)] == ["slower_decoding"]


def test_gains_below_one_read_slower_never_point_three_faster() -> None:
    shown = rv.gains({"gains": {"latency_ratio": 0.3125, "size_ratio": 1.8}})
    assert [(g.value_text, g.word, g.better) for g in shown] == [
        ("1.80\u00d7", "smaller", None), ("3.20\u00d7", "slower", False)]


def test_progress_text_of_a_failed_job_is_not_a_percentage() -> None:
    assert rv.progress_text("failed", 5, 5, 80.0) == "failed at step 5/5"
    assert rv.progress_text("failed", 2, 5, 20.0, failed_in="steps[0] prune") == "failed in steps[0] prune"
    assert rv.progress_text("running", 2, 5, 40.0, 1, 3) == "40% · step 2/5 · epoch 1/3"
    assert rv.progress_text("succeeded", 5, 5, 80.0) == "100% · 5 steps"


def test_accuracy_drop_text_rounds_for_people() -> None:
    assert rv.accuracy_drop_text(0.010101, 0.01, 397) == "\u22121.01 points, 4 of 397 samples (allowed \u22121.00)"
    assert rv.accuracy_drop_text(None) == "the metric could not be measured"


def test_lm_comparison_rows() -> None:
    from tests.api.report_samples import lm_report

    report = lm_report()
    rows = {r.key: r for r in rv.comparison_rows(report)}
    assert list(rows)[:5] == ["size_bytes", "perplexity", "decode_tokens_per_s", "peak_memory_bytes", "latency_ms"]
    ppl = rows["perplexity"]
    assert (ppl.before_text, ppl.after_text, ppl.better) == ("12.41", "12.97", False)  # lower is better
    dec = rows["decode_tokens_per_s"]
    assert (dec.change_text, dec.better) == ("2.79\u00d7 faster", True)
    assert rows["latency_ms"].label == "prefill 128 tokens median (ms)" and rows["latency_ms"].better is True
    assert rows["peak_memory_bytes"].after_text == "1.12 GB"
    # a slower decode reads slower, and a classifier report keeps its plain latency label
    report["output"]["decode"]["tokens_per_s"] = 4.9
    assert {r.key: r for r in rv.comparison_rows(report)}["decode_tokens_per_s"].change_text == "2.00\u00d7 slower"
    assert rv.comparison_rows(sample_report())[1].label == "latency median (ms)"


def test_lm_quality_rows_and_gains() -> None:
    from tests.api.report_samples import lm_report

    report = lm_report()
    quality = {q.label: q for q in rv.quality_rows(report)}
    assert quality["budget (max perplexity +5.00%)"].value_text == "met"
    assert quality["perplexity change"].value_text == "+4.51%"
    assert quality["vs input: next-token top-1 agreement"].value_text == "0.9137"
    assert not any(label.startswith("fidelity") for label in quality)
    words = [(g.value_text, g.word) for g in rv.gains(report)]
    assert ("2.79\u00d7", "faster decoding") in words
    report["gains"]["decode_speedup"] = 0.5
    assert ("2.00\u00d7", "slower decoding") in [(g.value_text, g.word) for g in rv.gains(report)]


def test_generation_rows_pair_by_prompt() -> None:
    report = {"input": {"generations": [{"prompt": "a", "text": "1"}, {"prompt": "b", "text": "2"}]},
              "output": {"generations": [{"prompt": "b", "text": "3"}, {"prompt": "c", "text": "4"}]}}
    assert [(g.prompt, g.before, g.after) for g in rv.generation_rows(report)] == [
        ("a", "1", "-"), ("b", "2", "3"), ("c", "-", "4")]
    assert rv.generation_rows(sample_report()) == []


def test_a_slower_decode_is_a_warning() -> None:
    side = {"latency_ms": {"median": 1.0}, "size_bytes": 100}
    found = rv.regressions({**side, "decode": {"tokens_per_s": 1000.0}}, {**side, "decode": {"tokens_per_s": 250.0}})
    assert [(w["code"], w["ratio"]) for w in found] == [("slower_decoding", 4.0)]
    assert found[0]["message"] == "decodes 4.0\u00d7 slower than the input model (1,000 \u2192 250 tokens/s)"
    within_noise = rv.regressions({**side, "decode": {"tokens_per_s": 100.0}}, {**side, "decode": {"tokens_per_s": 96.0}})
    assert within_noise == []


def test_step_rows_show_auto_exclude_and_budget_held() -> None:
    quantize = {"index": 0, "type": "quantize", "metrics": {"mode": "dynamic", "auto_exclude": {
        "kept_float": ["/0/Gemm"], "met": True, "cost": {"size_bytes": 48419, "latency_ms": 0.0021}}}}
    finetune = {"index": 1, "type": "finetune", "metrics": {"budget_held": False, "epochs_run": 6}}
    q, ft = rv.step_rows({"steps": [quantize, finetune]})
    assert q.metrics_text == "mode=dynamic kept_float=/0/Gemm target_met=yes float_cost=47.28 KB,0.0021ms"
    assert ft.metrics_text == "budget_held=no epochs_run=6"
    assert rv.auto_exclude_text({"auto_exclude": {"kept_float": [], "met": False}}) == (
        "kept_float=none target_met=no float_cost=-,-ms")


def test_a_weight_only_step_shows_its_settings() -> None:
    report = {"steps": [{"index": 0, "type": "quantize", "label": "quantize (int4)", "wall_s": 3.0, "metrics": {
        "weight_only": {"algorithm": "rtn", "block_size": 64, "symmetric": False, "accuracy_level": 4,
                        "matmul_bits": {"4": 16, "8": 1}, "embeddings": 2}}}]}
    (row,) = rv.step_rows(report)
    assert row.metrics_text == "rtn block=64 asym 4-bit=16 8-bit=1 embeddings=2"


def test_an_lm_headline_leads_with_perplexity_then_decode_speed_and_leaves_out_same_size() -> None:
    """After LoRA: same size (no '1.00x smaller'), perplexity -7 % first."""
    side = {"latency_setup": {"what": "prefill", "prompt_tokens": 32}}
    report = {"task": "text-generation",
              "input": {**side, "perplexity": 20.0, "size_bytes": 574_000, "decode": {"tokens_per_s": 10_100.3}},
              "output": {**side, "perplexity": 18.6, "size_bytes": 574_000, "decode": {"tokens_per_s": 12_120.0}},
              "gains": {"size_ratio": 1.0, "latency_ratio": 1.001, "params_ratio": 1.0, "decode_speedup": 1.2}}
    found = [(g.value_text, g.word, g.better) for g in rv.gains(report)]
    assert found == [("\u22127.0 %", "perplexity", True), ("1.20\u00d7", "faster decoding", None)]
    worse = {**report, "output": {**report["output"], "perplexity": 21.0},
             "gains": {**report["gains"], "size_ratio": 3.58, "latency_ratio": 0.5}}
    assert [(g.value_text, g.word) for g in rv.gains(worse)] == [
        ("+5.0 %", "perplexity"), ("1.20\u00d7", "faster decoding"), ("3.58\u00d7", "smaller"),
        ("2.00\u00d7", "slower prefill")]
    assert rv.latency_title(report) == "prefill 32 tokens" and rv.latency_title({"input": {}}) == "latency"
    # tokens/s for people: never '1.01e+04'
    rows = {r.key: r for r in rv.comparison_rows(report)}
    assert rows["decode_tokens_per_s"].before_text == "10,100" and "e+" not in rows["decode_tokens_per_s"].after_text
    assert rv.fmt_number(10_100.3) == "10,100" and rv.fmt_number(9_876.5) == "9876" and rv.fmt_number(0.5037) == "0.5037"


def test_the_eval_curve_is_named_after_the_metric_it_holds() -> None:
    lm_curve = [{"epoch": 1, "loss": 3.1, "eval_metric": 2.9, "eval_loss": 2.9, "perplexity": 18.2, "lr": 1e-3},
                {"epoch": 2, "loss": 2.7, "eval_metric": 2.6, "eval_loss": 2.6, "perplexity": 13.5, "lr": 5e-4}]
    (row,) = rv.step_rows({"steps": [{"index": 0, "label": "finetune (lora)", "curve": lm_curve}]})
    assert list(row.curves) == ["loss", "eval_loss", "lr"]  # 'eval loss' on the page, not 'eval metric'
    cls_curve = [{"epoch": 1, "loss": 1.2, "eval_metric": 0.8, "accuracy": 0.8, "lr": 1e-3}]
    (row,) = rv.step_rows({"steps": [{"index": 0, "label": "finetune", "curve": cls_curve}]})
    assert "eval_accuracy" in row.curves
    (row,) = rv.step_rows({"steps": [{"index": 0, "label": "x", "curve": [{"epoch": 1, "eval_metric": 0.5}]}]})
    assert list(row.curves) == ["eval_metric"]  # nothing says which metric: left as it was
