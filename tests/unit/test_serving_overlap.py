"""The decode step launched ahead (``engine/steps.py``) changes when work runs, never what comes out.

With overlap the next step is launched from the tokens still on the device, before the engine knows
whether a sequence stopped; sequences that did stop (EOS, a stop string, a grammar's end, max_tokens)
must leave the batch with exactly the output they have without overlap, and the wasted rows must not
disturb the others. Checked on CPU against the same engine with ``serving.runtime.overlap_decode`` off.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import PROMPTS, make_tiny_model_dir

from lmforge.config.serving import ServingConfig
from lmforge.serving.engine import Completion, Engine, SamplingParams
from lmforge.serving.engine.sampling import ResponseFormat

SCHEMA = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
                     "required": ["a", "b"]})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-overlap"))


def _run(model_dir: Path, overlap: bool, prompts: list[str], params: list[SamplingParams]) -> list[Completion]:
    cfg = ServingConfig(runtime={"overlap_decode": overlap}, scheduler={"max_batch_size": 4})
    engine = Engine.load(model_dir, device="cpu", cfg=cfg)
    try:
        assert engine.steps.overlap is overlap
        return engine.generate(prompts, params)
    finally:
        engine.close()


def test_overlap_changes_nothing_in_the_output(model_dir: Path) -> None:
    # More requests than rows (they join as others leave), sequences ending at different steps, by
    # length, by stop string and by EOS (a greedy run's own token made an EOS below), sampled rows
    # (seeded: their uniforms come from the request's own generator) and a constrained row.
    probe = _run(model_dir, False, [PROMPTS[0]], [SamplingParams(max_tokens=12, temperature=0)])[0]
    stop_text = probe.text[3:6] if len(probe.text) > 6 else "zz"
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(9)]
    params = [
        SamplingParams(max_tokens=12, temperature=0),
        SamplingParams(max_tokens=3, temperature=0),
        SamplingParams(max_tokens=12, temperature=0, stop=(stop_text,)),
        SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=7),
        SamplingParams(max_tokens=16, temperature=1.2, top_k=20, seed=8),
        SamplingParams(max_tokens=1, temperature=0),
        SamplingParams(max_tokens=24, temperature=0, response_format=ResponseFormat("json_schema", SCHEMA)),
        SamplingParams(max_tokens=9, temperature=0.7, seed=9),
        SamplingParams(max_tokens=7, temperature=0),
    ]
    plain = _run(model_dir, False, prompts, params)
    ahead = _run(model_dir, True, prompts, params)
    for a, b in zip(plain, ahead):
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
    assert plain[2].finish_reason == "stop" or stop_text not in plain[2].text
    assert [len(r.token_ids) for r in plain[:2]] == [12, 3] and plain[5].completion_tokens == 1
