"""Weight quantization at load (``quantize.py``: int8, int4, fp8; the fp8 KV cache dtype) and the
int4 packed layout it reads back (``int4_layout.py``)."""
