"""Hyperparameter search on Ray Tune: the search space, the search itself, and its MLflow runs.

:mod:`~lmforge.tune.space` turns the ``tune.space`` section into Ray Tune samplers and a sampled
trial back into a config; :mod:`~lmforge.tune.search` builds and runs the ``Tuner`` (ASHA, the
searcher, per-trial resources, retries); :mod:`~lmforge.tune.runs` records the parent MLflow run and
one nested run per trial. The trial itself (an in-line training run) is the tune stage's
(:mod:`lmforge.stages.tune`), which passes it in. Ray is imported only where a search runs.
"""
