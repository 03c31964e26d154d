"""Inference: the generation engine and the OpenAI-compatible HTTP server.

    python -m lmforge.serving MODEL          (or `lmforge serve MODEL`)

Where things are, top to bottom (each layer imports only the ones below it):

- ``api/``: what the rest of lmforge uses (``resolve_model_dir``, ``serve_model``), the HTTP server
  (``server.py``, ``protocol.py``), its process (``launch.py``) and the front proxy a local deployment
  keeps on its stable port while servers roll behind it (``proxy.py``).
- ``engine/``: the :class:`Engine` thread (``engine.py``, one step = schedule -> execute -> update),
  the scheduler (``scheduler.py``: admission, chunked prefill, preemption, finishing), requests and
  results (``requests.py``), per-sequence state (``sequence.py``), sampling and text
  (``sampling.py``), structured output (``structured.py``: ``response_format`` as xgrammar masks),
  Prometheus metrics (``metrics.py``).
- ``backends/``: the ``Backend`` protocol (``base.py``) and its implementations: ``paged.py`` (our
  Llama runner, paged KV cache, CUDA graphs), ``hf.py`` (any causal LM's own forward, dense
  cache), ``onnx.py`` (the HF one over ONNX Runtime); ``choose.py`` picks one for a model.
- ``model/``: loading a model directory (``loading.py``, ``onnx_model.py``), the paged runner
  (``runner.py``, ``ops.py``, ``graphs.py``, ``kv_cache.py``) and the HF forward (``hf_forward.py``).
- ``adapters/``: unmerged LoRA adapters per request (``lora_slots.py``), prompt-learning prefixes
  in the cache (``virtual_tokens.py``).
- ``quant/``: int8/int4/fp8 weights and the fp8 KV cache; ``kernels/``: every Triton kernel (the
  paged layer's and the quantized matmuls'); ``export/``: ``lmforge export-onnx``.
"""
