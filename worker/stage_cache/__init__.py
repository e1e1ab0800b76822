"""The stage cache: each pipeline prefix's output stored once, keyed by what determines it.

The key of steps ``0..i`` is the sha256 of a canonical JSON of the input model's sha256, the sha256s
of every model and dataset the job may read (train/eval/calibration, teachers, students), the
validated steps ``0..i``, the seed, the text/image preprocessing, the evaluation settings (a step's
report entry holds its eval), the export opset (it converts between forms), the task, the device and
the modelpress version. An entry holds the working model after step ``i`` as an ONNX file (a torch
module is exported first) in the blob store, and the step's report entry.

Entries are per owner (no tenant ever reads another's). Only models uploaded as ONNX are cached by
stage: a Hugging Face model's torch structure does not survive the ONNX round trip. A whole finished
job is an entry too (``kind='job'``): an identical job later succeeds at once with its artifacts.

One module per job: ``keys`` (what an entry is keyed by), ``prefix`` (the per-job view the pipeline calls
around its step loop: resume from the longest cached prefix, store each step's output), ``reuse`` (a whole
identical job finished at once from an earlier one), ``collect`` (gc by age and total size).
"""
