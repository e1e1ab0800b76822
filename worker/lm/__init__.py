"""Decoder-only language models (task ``text-generation``, any stock ``*ForCausalLM``).

The pieces, one module each:

- ``worker.formats.hf`` loads the archive as ``AutoModelForCausalLM`` (task ``text-generation``, inferred
  from the architecture); ``worker.formats.text`` turns JSONL rows into an :class:`ArrayDataset` with
  ``inputs = {"input_ids", "attention_mask"}`` (int64 ``[N, T]``, right-padded), ``labels`` int64 ``[N, T]``
  aligned with ``input_ids`` (``-100`` where no loss is taken) and ``meta`` (``shape``, ``prompts``,
  ``rows``). Row shapes: ``{"text"}`` (packed to ``text.max_length``), ``{"prompt", "completion"}``
  (loss on the completion only), ``{"messages"}`` (chat template; loss on assistant turns only),
  ``{"text", "label"}`` with ``evaluate.choices`` (zero-/few-shot scoring).
- ``worker.lm.importance``: per-decoder-layer importance on calibration text (ShortGPT's block
  influence, 1 - cos(h_in, h_out), Men et al. 2024) and ``keep_layers`` (drop the rest, config updated).
- ``worker.lm.export``: torch -> ONNX with a KV cache in the usual layout (``input_ids``,
  ``attention_mask``, optional ``position_ids``, ``past_key_values.{i}.key|value`` ->
  ``logits``, ``present.{i}.key|value``); the layout is recorded in ``WorkingModel.meta["lm"]``.
- ``worker.lm.session``: an ONNX Runtime session over such a file: full-sequence logits, greedy
  generation with the cache, prefill and decode timing.
- ``worker.lm.evaluate``: the one harness for input and output LMs (perplexity, top-1 agreement and
  KL against the input model, choice accuracy, prefill ms, decode tokens/s, peak memory, generations).
"""
