"""What the benchmarks share: the one record format (``record``), their common command-line parts
(``cli``: ``--out``, ``--tiny``, checked name lists) and the synthetic serving model (``serve``)."""
