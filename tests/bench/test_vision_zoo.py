"""bench.vision_zoo: the pages it draws (labels are clockwise quarter turns, seeded) and the walkthrough's spec."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.vision_zoo import EVAL_TEXTS, job_spec, pages, write_pages


def test_pages_are_seeded_quarter_turns_of_text() -> None:
    x, y = pages(EVAL_TEXTS, 8, seed=3)
    assert x.shape == (8, 3, 224, 224) and x.dtype == np.float32
    assert y.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    again, _ = pages(EVAL_TEXTS, 8, seed=3)
    assert np.array_equal(x, again) and not np.array_equal(x, pages(EVAL_TEXTS, 8, seed=4)[0])
    white = (1.0 - 0.485) / 0.229  # the normalised value of a white pixel's red channel
    assert np.isclose(x[:, 0].max(), white, atol=1e-4) and x[:, 0].min() < 0  # ink on white
    # Lines of text leave blank rows between them: upright or upside down (labels 0, 2) fewer rows than columns
    # hold ink; turned a quarter (1, 3), fewer columns than rows.
    ink = x[:, 0] < 0
    rows, cols = ink.any(axis=2).sum(axis=1), ink.any(axis=1).sum(axis=1)
    assert (rows[0::2] < cols[0::2]).all() and (cols[1::2] < rows[1::2]).all(), (rows, cols)

def test_the_spec_is_the_walkthrough() -> None:
    a = argparse.Namespace(ratio=0.5, epochs=3, batch_size=16, calibration=64, latency_runs=50, seed=0)
    spec = job_spec(a, "mdl_x", {"train": "ds_t", "eval": "ds_e"})
    assert [(s["type"], s.get("method") or s.get("mode")) for s in spec["steps"]] == [
        ("prune", "structured"), ("distill", None), ("quantize", "static")]
    assert spec["steps"][0]["ratio"] == 0.5 and spec["data"] == {"train": "ds_t", "eval": "ds_e"}


def test_the_pages_files_hold_train_and_held_out_eval_pages(tmp_path: Path) -> None:
    files = write_pages(tmp_path, 4, 2, seed=5)
    assert set(files) == {"train", "eval"}
    train, evald = np.load(files["train"]), np.load(files["eval"])
    assert train["x"].shape == (4, 3, 224, 224) and train["labels"].tolist() == [0, 1, 2, 3]
    assert evald["x"].shape == (2, 3, 224, 224) and np.array_equal(evald["x"], pages(EVAL_TEXTS, 2, seed=6)[0])
