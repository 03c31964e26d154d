"""Device check of the serving engine's adapter and quantization paths against references:
``python -m bench.serve.gpu_check`` (``__main__``); the checks (``checks``), tiny models and
adapters (``models``), running the engine (``engine``) and comparing (``compare``)."""
