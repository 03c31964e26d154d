"""Training benchmarks on one GPU: the loop against plain transformers/peft loops (``gpu``), the
whole engine end to end (``gpu_engine``) and the attention kernels alone (``attention``)."""
