"""The search: a Ray Tune ``Tuner`` over the trial function, with ASHA, the searcher and retries.

Each trial reserves ``tune.resources`` in Ray; at most ``tune.max_concurrent`` run at once. ASHA
counts a trial's reports (one per validation) and stops those whose metric lags at each rung. A
trial that raises is retried ``tune.max_failures`` times (Ray Tune's ``FailureConfig``; the trial
function resumes from its own checkpoint) and then recorded as failed; the search goes on.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from lmforge.config.tune import TuneConfig
from lmforge.core.errors import ConfigError
from lmforge.core.ray_cluster import connect_ray
from lmforge.core.runtime import cpu_count
from lmforge.tune.space import samplers

if TYPE_CHECKING:
    from ray.tune import Callback, ResultGrid


def check_searcher(settings: TuneConfig) -> None:
    """Refuse a searcher whose package is missing, before Ray starts."""
    if settings.searcher == "optuna" and importlib.util.find_spec("optuna") is None:
        raise ConfigError("tune.searcher is optuna, but the optuna package is not installed",
                          "install it (`pip install optuna`), or set tune.searcher: random")


def start_ray(settings: TuneConfig, ray_address: str | None) -> None:
    """Join ``RAY_ADDRESS`` (else ``ray_address``) or start a local Ray with room for the concurrent trials."""
    # Logical CPUs: max_concurrent trials fit side by side even where the machine has fewer cores.
    need = int(settings.max_concurrent * settings.resources.cpus + 0.999)
    connect_ray(ray_address, log_to_driver=False, num_cpus=max(need, cpu_count()))


def run_search(trial: Callable[..., None], trial_args: dict[str, Any], settings: TuneConfig, metric: str,
               horizon: int, storage: dict[str, Any], name: str, callbacks: Sequence[Callback],
               restore: bool = False) -> ResultGrid:
    """Run ``settings.max_trials`` trials of ``trial(sampled, **trial_args)``; Ray Tune's results.

    ``horizon`` is the most reports (validations) a trial makes, ASHA's ``max_t``; ``storage`` is the
    ``RunConfig`` keywords of the workspace's Ray storage (:func:`lmforge.train.recovery.ray_storage_args`:
    a path, or the object store's path and filesystem), under which ``name`` is the experiment's
    directory (Ray Tune's own state). ``restore``: continue that experiment (``Tuner.restore``: its scheduler,
    searcher and finished trials as saved; unfinished and errored trials start again; the callbacks are the
    ones the search started with, saved in its state).
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    resources = {"cpu": settings.resources.cpus, "gpu": settings.resources.gpus}
    trainable = tune.with_resources(tune.with_parameters(trial, **trial_args), resources)
    if restore:
        path = f"{storage['storage_path'].rstrip('/')}/{name}"
        filesystem = storage.get("storage_filesystem")
        if not tune.Tuner.can_restore(path, storage_filesystem=filesystem):
            raise ConfigError(f"--resume {name}: Ray Tune saved no state of that search at {path} (it was stopped "
                              "before its first trial started)", "start a new search without --resume")
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                  param_space=samplers(settings.space), storage_filesystem=filesystem).fit()

    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max(horizon, settings.asha.grace_period),
                              grace_period=settings.asha.grace_period,
                              reduction_factor=settings.asha.reduction_factor) \
        if settings.scheduler == "asha" else FIFOScheduler()
    tuner = tune.Tuner(
        trainable,
        param_space=samplers(settings.space),
        tune_config=tune.TuneConfig(metric=metric, mode=settings.mode, num_samples=settings.max_trials,
                                    # The random searcher limits concurrency itself (Tune ignores this with it).
                                    max_concurrent_trials=settings.max_concurrent if settings.searcher != "random"
                                    else None, scheduler=scheduler, search_alg=_searcher(settings),
                                    reuse_actors=False),
        run_config=tune.RunConfig(name=name, **storage, callbacks=list(callbacks), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=settings.max_failures)),
    )
    return tuner.fit()


def _searcher(settings: TuneConfig) -> Any:
    if settings.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=settings.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Seeded, so a search samples the same configs again (ASHA's decisions still follow the timing).
    return BasicVariantGenerator(random_state=settings.seed, max_concurrent=settings.max_concurrent)
