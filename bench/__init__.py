"""lmforge's benchmarks: one module per benchmark, run from the repository root as a module.

    python -m bench.<group>.<benchmark> [--tiny] [--out DIR] ...

Groups: ``bench.train`` (training speed on a GPU), ``bench.serve`` (the inference engine on a GPU
and a CPU, over HTTP), ``bench.data`` (collection and curation throughput); ``bench.common`` holds
what they share (the record writer, command-line parts, the synthetic serving model). Each
benchmark measures its baseline in the same run and appends one JSON record per figure to
``bench/results/<benchmark>.jsonl`` (``bench.common.record``); ``bench/RESULTS.md`` is the table of
the latest figures with the command of each. ``--tiny`` runs a benchmark's whole code path on a
CPU in seconds and writes its records to a temporary directory; tests/integration/test_bench_tiny.py runs every
one of them.

On a bare GPU machine (torch, transformers, peft only) put lmforge on the path:
``PYTHONPATH=src python -m bench.train.gpu``.
"""
