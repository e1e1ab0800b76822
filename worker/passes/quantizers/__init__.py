"""The quantize step's back ends, one module per mode family (the pass itself is ``worker/passes/quantize.py``)."""
