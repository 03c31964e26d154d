"""The served model: loading a directory (``loading.py``), our paged Llama runner (``runner.py``,
``ops.py``, ``graphs.py`` over ``kv_cache.py``), the HF forward (``hf_forward.py``) and an ONNX
export seen as a causal LM (``onnx_model.py``)."""
