"""Serving benchmarks: the engine on a GPU against transformers (``gpu``), its quantization options
(``quant``), the device check of its adapter and quantization paths (``gpu_check``), the demo model
on a CPU (``cpu``), unmerged multi-LoRA on a CPU (``lora_cpu``) and Poisson load over HTTP (``load``)."""
