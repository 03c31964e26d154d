"""Model backends: what holds the model and its KV cache and runs forward passes for the engine.

``base.py`` is the protocol every backend fulfils; ``choose.py`` picks ``paged.py``, ``hf.py`` or
``onnx.py`` for a model.
"""
