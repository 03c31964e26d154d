"""The generation engine: requests in, tokens out, with continuous batching (see ``engine.py``).

``from lmforge.serving.engine import Engine, SamplingParams`` is the way in for scripts and
benchmarks; the scheduler (``scheduler.py``) decides what each step runs.
"""

from lmforge.serving.engine.engine import (
                                           Completion,
                                           Delta,
                                           Engine,
                                           EngineBusy,
                                           GenerationStream,
                                           RequestError,
                                           SamplingParams,
                                           TokenLogprob,
)

__all__ = ["Completion", "Delta", "Engine", "EngineBusy", "GenerationStream", "RequestError", "SamplingParams",
           "TokenLogprob"]
