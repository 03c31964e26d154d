"""Every Triton kernel of serving, imported only where Triton is present: the paged layer's ops
(``layer.py``, and ``decode_attention.py``'s split-K decode attention, behind ``model/ops.py``'s
``TritonOps``) and the quantized matmuls (``quant.py``, behind ``quant/quantize.py``)."""
