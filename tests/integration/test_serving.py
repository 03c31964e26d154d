"""The inference engine and the OpenAI-compatible server, on a tiny random Llama.

The engine is checked against ``model.generate`` and against itself (batched vs one by one,
requests joining mid-flight); the server runs for real on loopback and is called with httpx and
with the official ``openai`` client.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from helpers import PROMPTS, make_tiny_model_dir, serve

from lmforge.config.serving import RuntimeConfig, SchedulerConfig, ServingConfig
from lmforge.core.errors import ServingError
from lmforge.serving.api.launch import run_server
from lmforge.serving.api.server import create_app
from lmforge.serving.engine import Engine, RequestError, SamplingParams

CFG = ServingConfig(max_new_tokens=24, scheduler=SchedulerConfig(max_batch_size=4))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[Engine]:
    eng = Engine.load(model_dir, device="cpu", max_batch_size=CFG.scheduler.max_batch_size)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def url(engine: Engine) -> Iterator[str]:
    with serve(create_app(engine, "tiny", CFG)) as (base, _):
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


GREEDY = SamplingParams(max_tokens=20, temperature=0)


# ---------------------------------------------------------------- engine


def test_greedy_matches_model_generate(engine: Engine) -> None:
    for prompt in PROMPTS[:2]:
        ids = torch.tensor([engine.encode(prompt)])
        expected = engine.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20)
        (result,) = engine.generate([prompt], GREEDY)
        assert result.token_ids == tuple(expected[0, ids.shape[1]:].tolist())
        assert result.prompt_tokens == ids.shape[1]
        assert result.completion_tokens == len(result.token_ids)
        assert result.finish_reason == ("stop" if result.token_ids[-1] in engine.eos_ids else "length")


def test_batch_of_different_lengths_equals_one_by_one(engine: Engine) -> None:
    solo = [engine.generate([p], GREEDY)[0] for p in PROMPTS]
    before = engine.stats["peak_batch"]
    together = engine.generate(PROMPTS, GREEDY)
    assert [r.token_ids for r in together] == [r.token_ids for r in solo]
    assert [r.text for r in together] == [r.text for r in solo]
    assert max(before, len(PROMPTS)) == engine.stats["peak_batch"]  # they really shared a batch


@pytest.mark.parametrize("first", [0, 3], ids=["short-first", "long-first"])
def test_requests_joining_mid_flight_match_solo(engine: Engine, first: int) -> None:
    """Continuous batching: requests admitted while another decodes get the same tokens, whether
    the running rows or the joining ones need the extra left padding."""
    order = [PROMPTS[first]] + [p for i, p in enumerate(PROMPTS) if i != first]
    long = SamplingParams(max_tokens=90, temperature=0)
    solo = [engine.generate([p], long if i == 0 else GREEDY)[0] for i, p in enumerate(order)]

    async def run() -> list:
        running = engine.stream(order[0], long)
        prefix = [await running.__anext__() for _ in range(3)]
        assert all(d.completion is None for d in prefix)
        later = [engine.stream(p, GREEDY) for p in order[1:]]  # queued now, while `running` decodes
        return [await running.result(), *await asyncio.gather(*(s.result() for s in later))]

    merges = engine.stats["merges"]
    joined = asyncio.run(run())
    assert engine.stats["merges"] > merges  # the later requests joined the running batch
    assert [r.token_ids for r in joined] == [r.token_ids for r in solo]


def test_cpu_threads_one_for_small_models_unless_configured() -> None:
    from types import SimpleNamespace

    from lmforge.serving.engine.engine import cpu_threads

    small, wide = SimpleNamespace(hidden_size=128), SimpleNamespace(hidden_size=2048)
    assert cpu_threads(ServingConfig(), small) == 1
    assert cpu_threads(ServingConfig(), wide) >= 1
    assert cpu_threads(ServingConfig(runtime=RuntimeConfig(cpu_threads=3)), small) == 3
    # The engine thread sets its own OpenMP count: the caller's stays as it was.
    before = torch.get_num_threads()
    seen = []
    worker = threading.Thread(target=lambda: (torch.set_num_threads(1), seen.append(torch.get_num_threads())))
    worker.start()
    worker.join()
    assert seen == [1] and torch.get_num_threads() == before


def test_seed_makes_sampling_reproducible(engine: Engine) -> None:
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=40, seed=7)
    alone = engine.generate([PROMPTS[1]], params)[0]
    in_batch = engine.generate(PROMPTS, params)[1]  # other rows must not disturb this one's draws
    assert alone.token_ids == in_batch.token_ids
    others = {engine.generate([PROMPTS[1]], SamplingParams(max_tokens=16, temperature=1.0, seed=s))[0].token_ids
              for s in range(4)}
    assert len(others) > 1


def test_stop_string_ends_the_text_without_it(engine: Engine) -> None:
    full = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=24, temperature=0))[0].text
    clean = [i for i in range(3, len(full) - 2) if "\ufffd" not in full[i : i + 2]]
    assert clean, f"greedy text too short for a stop string: {full!r}"
    stop = full[clean[0] : clean[0] + 2]
    params = SamplingParams(max_tokens=24, temperature=0, stop=["never-appears", stop])

    async def streamed() -> tuple[str, object]:
        parts, last = [], None
        async for delta in engine.stream(PROMPTS[0], params):
            parts.append(delta.text)
            last = delta
        return "".join(parts), last.completion

    text, result = asyncio.run(streamed())
    assert result.text == text == full[: full.find(stop)]
    assert result.finish_reason == "stop" and stop not in text


def test_context_window_and_params_are_checked(engine: Engine) -> None:
    with pytest.raises(RequestError, match="128"):
        engine.generate(["x " * 200], GREEDY)
    with pytest.raises(RequestError, match="token ids"):
        engine.generate([[len(engine.tokenizer) + 5]], GREEDY)  # refused before it can fail a shared batch
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=3)


# ---------------------------------------------------------------- HTTP with httpx


def test_health_and_models(url: str) -> None:
    assert httpx.get(f"{url}/health").json() == {"status": "ok", "model": "tiny"}
    models = httpx.get(f"{url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["object"] == "list"


def test_completion_matches_engine_and_schema(url: str, engine: Engine) -> None:
    reply = httpx.post(f"{url}/v1/completions",
                       json={"model": "tiny", "prompt": PROMPTS[3], "max_tokens": 12, "temperature": 0})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    expected = engine.generate([PROMPTS[3]], SamplingParams(max_tokens=12, temperature=0))[0]
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == expected.text
    assert body["choices"][0]["finish_reason"] == expected.finish_reason
    cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]  # prefix cache hits: earlier tests' prompts
    assert 0 <= cached < expected.prompt_tokens
    assert body["usage"] == {"prompt_tokens": expected.prompt_tokens, "completion_tokens": expected.completion_tokens,
                             "total_tokens": expected.prompt_tokens + expected.completion_tokens,
                             "prompt_tokens_details": {"cached_tokens": cached}}


def test_concurrent_http_requests_batch_and_match(url: str, engine: Engine) -> None:
    solo = [engine.generate([p], GREEDY)[0].text for p in PROMPTS]

    async def fire() -> list[str]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            replies = await asyncio.gather(*[
                http.post("/v1/completions", json={"prompt": p, "max_tokens": 20, "temperature": 0}) for p in PROMPTS
            ])
        return [r.json()["choices"][0]["text"] for r in replies]

    assert asyncio.run(fire()) == solo


def test_completion_logprobs_shape(url: str) -> None:
    body = httpx.post(f"{url}/v1/completions",
                      json={"prompt": "The quick", "max_tokens": 6, "temperature": 0, "logprobs": 3}).json()
    lp, n = body["choices"][0]["logprobs"], body["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert all(v <= 0 for v in lp["token_logprobs"])
    # Greedy: the chosen token is the most likely one, so its logprob tops the alternatives.
    assert all(1 <= len(top) <= 3 and max(top.values()) == pytest.approx(chosen)
               for top, chosen in zip(lp["top_logprobs"], lp["token_logprobs"]))


def test_errors_are_openai_shaped(url: str) -> None:
    def post(payload: object, raw: str | None = None) -> httpx.Response:
        if raw is not None:
            return httpx.post(f"{url}/v1/completions", content=raw, headers={"content-type": "application/json"})
        return httpx.post(f"{url}/v1/completions", json=payload)

    bad_temp = post({"prompt": "hi", "temperature": 5})
    assert bad_temp.status_code == 400 and bad_temp.json()["error"]["param"] == "temperature"
    malformed = post(None, raw='{"prompt": "hi",')
    assert malformed.status_code == 400 and "JSON" in malformed.json()["error"]["message"]
    unknown = post({"model": "gpt-4", "prompt": "hi"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    too_long = post({"prompt": "word " * 150, "max_tokens": 10})
    message = too_long.json()["error"]["message"]
    assert too_long.status_code == 400 and "max_tokens is 10" in message and "128" in message
    assert too_long.json()["error"]["code"] == "context_length_exceeded"
    over_cap = post({"prompt": "hi", "max_tokens": CFG.max_new_tokens + 1})
    assert over_cap.status_code == 400 and over_cap.json()["error"]["param"] == "max_tokens"
    for field, value in [("n", 99), ("top_p", 0), ("max_tokens", 0), ("bogus", 1)]:  # n past serving.limits.max_n
        reply = post({"prompt": "hi", field: value})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == field, reply.text
    assert set(unknown.json()["error"]) == {"message", "type", "param", "code"}


def test_aborted_stream_leaves_the_server_healthy(url: str) -> None:
    with httpx.stream("POST", f"{url}/v1/completions",
                      json={"prompt": "The quick", "max_tokens": 24, "stream": True}) as reply:
        assert next(reply.iter_lines()).startswith("data: ")
    after = httpx.post(f"{url}/v1/completions", json={"prompt": "The quick", "max_tokens": 4})
    assert after.status_code == 200


def test_api_key_is_required_when_set(engine: Engine) -> None:
    with serve(create_app(engine, "tiny", CFG, api_key="s3cret")) as (base, _):
        payload = {"prompt": "hi", "max_tokens": 2}
        missing = httpx.post(f"{base}/v1/completions", json=payload)
        wrong = httpx.post(f"{base}/v1/completions", json=payload, headers={"Authorization": "Bearer nope"})
        right = httpx.post(f"{base}/v1/completions", json=payload, headers={"Authorization": "Bearer s3cret"})
        assert missing.status_code == wrong.status_code == 401
        assert wrong.json()["error"]["code"] == "invalid_api_key"
        assert right.status_code == 200
        assert httpx.get(f"{base}/health").status_code == 200  # probes need no key
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="nope", max_retries=0).models.list()


# ---------------------------------------------------------------- HTTP with the openai client


def test_openai_client_completions_and_stream(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_openai_client_chat_and_stream(client: openai.OpenAI, engine: Engine) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does json.dumps do?"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                           logprobs=True, top_logprobs=2)
    prompt = engine.render_chat(messages)
    assert prompt.endswith("### Response:\n") and "### Instruction:\nWhat does json.dumps do?" in prompt
    expected = engine.generate([engine.encode(prompt, add_special_tokens=False)],
                               SamplingParams(max_tokens=16, temperature=0))[0]
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert whole.usage.prompt_tokens == expected.prompt_tokens
    assert len(choice.logprobs.content) == whole.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason


def test_openai_client_errors_and_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["tiny"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="hi")
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=9)
    assert err.value.body["param"] == "temperature"


# ---------------------------------------------------------------- run_server


def test_port_in_use_raises_serving_error(model_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServingError) as err:
            run_server(model_dir, CFG, "tiny", host="127.0.0.1", port=port)
    assert str(port) in err.value.cause and "port" in err.value.fix


def test_server_json_round_trip_is_valid_sse(url: str) -> None:
    with httpx.stream("POST", f"{url}/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[len("data: "):])["object"] == "chat.completion.chunk" for e in events[:-1])
