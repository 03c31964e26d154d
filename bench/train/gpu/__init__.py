"""Training throughput on one GPU, plain loops against lmforge's engine: ``python -m bench.train.gpu``
(``__main__``); its rows as typed records (``variants``), building and timing them (``runner``), and
the figures written from them (``records``)."""
