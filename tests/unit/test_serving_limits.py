"""Hostile and careless requests to the inference server (issue 20, items 1, 2, 5 and 11's serving bits).

The app runs in-process under FastAPI's TestClient over the tiny model of tests/conftest.py: every
answer is checked as a client would see it (status, JSON body). Property-based tests throw random
JSON and adversarial strings at both endpoints: never a 5xx, always a JSON body.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.config.serving import LimitsConfig, ServingConfig
from lmforge.core.errors import ConfigError, DataError, LmforgeError, ServingError
from lmforge.core.workspace import Workspace
from lmforge.serving.api.serve import api_key_from, resolve_model_dir
from lmforge.serving.api.server import create_app
from lmforge.serving.engine import Engine
from lmforge.train.artifacts import MARKER, load_trained, marked_adapter_dir

CFG = ServingConfig(max_new_tokens=2)
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[Engine]:
    eng = Engine.load(model_dir, device="cpu", cfg=CFG)
    yield eng
    eng.close()


def _client(engine: Engine, cfg: ServingConfig = CFG, api_key: str | None = None) -> TestClient:
    # raise_server_exceptions=False: a bug must show as the 500 a client would get, which the tests refuse.
    return TestClient(create_app(engine, "tiny", cfg, api_key=api_key), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(engine: Engine) -> TestClient:
    return _client(engine)


def _raw(client: TestClient, path: str, body: str | bytes, **headers: str):
    return client.post(path, content=body, headers={"content-type": "application/json", **headers})


def _error(reply, status: int = 400) -> dict:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# ---------------------------------------------------------------- item 2: lone surrogates


@pytest.mark.parametrize(("path", "body", "param"), [
    (COMPLETIONS, '{"prompt": "a\\ud800b"}', "prompt"),
    (COMPLETIONS, '{"prompt": ["\\udfff"]}', "prompt"),
    (CHAT, '{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages"),
    (CHAT, '{"messages": [{"role": "user", "content": [{"type": "text", "text": "x\\udc00"}]}]}', "messages"),
    (CHAT, '{"messages": [{"role": "user", "content": "hi", "name": "\\ud83d"}]}', "messages"),
    (COMPLETIONS, '{"prompt": "a", "stop": ["\\ud800"]}', "stop"),
    (COMPLETIONS, '{"prompt": "a", "user": "\\ud800"}', "user"),
])
def test_lone_surrogate_is_a_400_naming_it(client: TestClient, path: str, body: str, param: str) -> None:
    error = _error(_raw(client, path, body))
    assert "surrogate" in error["message"] and error["param"] == param


def test_a_valid_surrogate_pair_is_text(client: TestClient) -> None:
    reply = _raw(client, COMPLETIONS, '{"prompt": "snake \\ud83d\\udc0d", "max_tokens": 1}')
    assert reply.status_code == 200, reply.text


def test_an_unknown_key_holding_a_surrogate_still_gets_json(client: TestClient) -> None:
    error = _error(_raw(client, CHAT, '{"messages": [{"role": "user", "content": "hi"}], "x\\ud800": 1}'))
    assert error["code"] == "invalid_value"


# ---------------------------------------------------------------- item 11: strict types, bearer


@pytest.mark.parametrize(("path", "field", "value"), [
    (COMPLETIONS, "stream", "yes"), (COMPLETIONS, "stream", 1), (COMPLETIONS, "echo", "true"),
    (COMPLETIONS, "max_tokens", "2"), (COMPLETIONS, "max_tokens", 2.0), (COMPLETIONS, "logprobs", "1"),
    (COMPLETIONS, "temperature", "0.5"), (COMPLETIONS, "seed", True), (CHAT, "logprobs", "true"),
    (CHAT, "stream_options", {"include_usage": "yes"}),
])
def test_types_are_strict(client: TestClient, path: str, field: str, value: object) -> None:
    base = {"prompt": "hi"} if path == COMPLETIONS else {"messages": [{"role": "user", "content": "hi"}]}
    error = _error(client.post(path, json={**base, field: value, "max_tokens": 1} if field != "max_tokens"
                               else {**base, field: value}))
    assert error["param"] == field


def test_an_int_is_a_valid_float(client: TestClient) -> None:
    reply = client.post(COMPLETIONS, json={"prompt": "hi", "temperature": 0, "top_p": 1, "max_tokens": 1})
    assert reply.status_code == 200, reply.text


def test_bearer_scheme_is_case_insensitive(engine: Engine) -> None:
    client = _client(engine, api_key="s3cret")
    body = {"prompt": "hi", "max_tokens": 1}
    for header in ["Bearer s3cret", "bearer s3cret", "BEARER s3cret", "Bearer  s3cret "]:
        assert client.post(COMPLETIONS, json=body, headers={"Authorization": header}).status_code == 200, header
    for header in ["Basic s3cret", "Bearer s3cre", "s3cret", "Bearer", "bearers3cret"]:
        error = _error(client.post(COMPLETIONS, json=body, headers={"Authorization": header}), 401)
        assert error["code"] == "invalid_api_key"


def test_api_key_from_flag_file_or_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LMFORGE_API_KEY", raising=False)
    assert api_key_from(None, None) is None
    monkeypatch.setenv("LMFORGE_API_KEY", "from-env")
    assert api_key_from(None, None) == "from-env"
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert api_key_from(None, key_file) == "from-file"
    assert api_key_from("from-flag", None) == "from-flag"
    with pytest.raises(ConfigError, match="--api-key and --api-key-file"):
        api_key_from("from-flag", key_file)
    with pytest.raises(ConfigError, match="cannot read") as err:
        api_key_from(None, tmp_path / "missing")
    assert "--api-key-file" in err.value.fix
    (tmp_path / "empty").write_text(" \n")
    with pytest.raises(ConfigError, match="empty"):
        api_key_from(None, tmp_path / "empty")


def test_a_missing_model_path_fails_before_anything_loads(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "home")
    for missing in [tmp_path / "nope", tmp_path]:  # absent, and a directory that is not a model
        with pytest.raises(ServingError, match="not a model directory") as err:
            resolve_model_dir(str(missing), ws)
        assert "models:/" in err.value.fix


# ---------------------------------------------------------------- item 1: limits


def test_limits_have_sane_defaults_and_refuse_unknown_keys() -> None:
    limits = ServingConfig().limits
    assert limits.max_body_bytes == 8 * 1024 * 1024 and limits.max_prompt_tokens is None
    assert (limits.max_stop, limits.max_logprobs) == (4, 20)
    with pytest.raises(ValueError, match="max_body"):
        ServingConfig.model_validate({"limits": {"max_body": 1}})


def test_a_prompt_far_past_the_window_is_refused_before_tokenizing(engine: Engine) -> None:
    client = _client(engine)
    chars = engine.context_window * CFG.limits.max_chars_per_token + 1
    calls: list[str] = []
    real = engine.tokenizer.encode
    engine.tokenizer.encode = lambda text, **kw: calls.append(text) or real(text, **kw)  # type: ignore[method-assign]  # counts calls
    try:
        for path, body, param in [(COMPLETIONS, {"prompt": "x" * chars}, "prompt"),
                                  (CHAT, {"messages": [{"role": "user", "content": "x" * (chars // 2 + 1)}] * 2},
                                   "messages")]:
            error = _error(client.post(path, json=body))
            assert error["code"] == "context_length_exceeded" and error["param"] == param
            assert "serving.limits.max_chars_per_token" in error["message"]
    finally:
        del engine.tokenizer.encode
    assert calls == []


def test_configured_limits_are_enforced(engine: Engine) -> None:
    limits = LimitsConfig(max_prompt_tokens=8, max_stop=2, max_stop_chars=5, max_logprobs=3)
    client = _client(engine, CFG.model_copy(update={"limits": limits}))
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    cases = [
        (COMPLETIONS, {"prompt": "hi", "stop": ["a", "b", "c"]}, "stop", "serving.limits.max_stop"),
        (COMPLETIONS, {"prompt": "hi", "stop": "abcdef"}, "stop", "serving.limits.max_stop_chars"),
        (COMPLETIONS, {"prompt": "hi", "logprobs": 4}, "logprobs", "serving.limits.max_logprobs"),
        (CHAT, {**chat, "logprobs": True, "top_logprobs": 4}, "top_logprobs", "serving.limits.max_logprobs"),
        (COMPLETIONS, {"prompt": "the quick brown fox jumps over the lazy dog"}, "prompt",
         "serving.limits.max_prompt_tokens"),
        (COMPLETIONS, {"prompt": "hi", "n": 9}, "n", "serving.limits.max_n"),
        (COMPLETIONS, {"prompt": "hi", "n": 10**30}, "n", "serving.limits.max_n"),
    ]
    for path, body, param, key in cases:
        error = _error(client.post(path, json={"max_tokens": 1, **body}))
        assert error["param"] == param, error
        assert key is None or key in error["message"], error
    ok = client.post(COMPLETIONS, json={"prompt": "hi", "stop": ["a", "bcdef"], "logprobs": 3, "max_tokens": 1})
    assert ok.status_code == 200, ok.text



def test_a_body_past_the_limit_is_a_413(engine: Engine) -> None:
    client = _client(engine, CFG.model_copy(update={"limits": LimitsConfig(max_body_bytes=2048)}))
    error = _error(client.post(COMPLETIONS, json={"prompt": "x" * 4096}), 413)
    assert error["code"] == "request_too_large" and "serving.limits.max_body_bytes" in error["message"]
    assert client.post(COMPLETIONS, json={"prompt": "x" * 100, "max_tokens": 1}).status_code == 200



@pytest.mark.parametrize(("path", "item", "where"), [
    (CHAT, '{"role": "user", "content": ""}', "in 2000 messages"),  # valid, each a turn of the template
    (CHAT, '{"role": "nobody"}', "at most 2048 items"),
    (CHAT, "1", "at most 2048 items"),
    (COMPLETIONS, '""', "at most 2048 items"),
])
def test_a_body_of_many_small_items_is_refused_cheaply(client: TestClient, path: str, item: str,
                                                       where: str) -> None:
    count = {"1": 1_000_000, '""': 1_000_000}.get(item, 2000 if "content" in item else 300_000)
    key = "messages" if path == CHAT else "prompt"
    body = '{"%s": [%s]}' % (key, ",".join([item] * count))  # noqa: UP031 - a brace-heavy JSON template
    reply = _raw(client, path, body)
    error = _error(reply)
    # One short answer, not one error per item (a million items made a 350 MB body after two minutes).
    assert where in error["message"] and len(reply.content) < 2048, error["message"][:300]


def test_an_object_of_many_keys_is_refused_as_a_whole(client: TestClient) -> None:
    keys = ",".join(f'"k{i}": 0' for i in range(300_000))
    for body in ['{"prompt": "a", %s}' % keys, '{"prompt": "a", "stream_options": {%s}}' % keys]:  # noqa: UP031 - as above
        reply = _raw(client, COMPLETIONS, body)
        error = _error(reply)
        assert "300001 keys" in error["message"] or "300000 keys" in error["message"]
        assert len(reply.content) < 2048


def test_a_chat_template_that_refuses_the_messages_is_a_400(client: TestClient, engine: Engine) -> None:
    template = engine.tokenizer.chat_template
    engine.tokenizer.chat_template = "{{ raise_exception('roles must alternate user/assistant') }}"
    try:
        error = _error(client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}]}))
    finally:
        engine.tokenizer.chat_template = template
    assert "roles must alternate" in error["message"] and error["param"] == "messages"


# ---------------------------------------------------------------- item 5: the adapter marker


def _marked(tmp_path: Path, adapter: object, files: dict[str, bytes] | None = None) -> Path:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / MARKER).write_text(json.dumps({"adapter": adapter, "format": "peft", "mergeable": False}))
    for name, data in (files or {}).items():
        (model / name).parent.mkdir(parents=True, exist_ok=True)
        (model / name).write_bytes(data)
    return model


def test_marker_pointing_outside_the_model_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "adapter_model.safetensors").write_bytes(b"")
    for adapter in ["../elsewhere", str(elsewhere), "adapter/../../elsewhere"]:
        with pytest.raises(DataError, match="outside") as err:
            marked_adapter_dir(_marked(tmp_path, adapter))
        assert "lmforge_adapter.json" in err.value.cause and err.value.fix
    model = _marked(tmp_path, "link")
    (model / "link").symlink_to(elsewhere)
    with pytest.raises(DataError, match="outside"):
        marked_adapter_dir(model)
    for bad in [None, 3, "", ["adapter"]]:
        with pytest.raises(DataError, match="adapter"):
            marked_adapter_dir(_marked(tmp_path, bad))
    (model / MARKER).write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        marked_adapter_dir(model)


def test_marker_adapter_must_be_safetensors(tmp_path: Path) -> None:
    model = _marked(tmp_path, "adapter", {"adapter/adapter_config.json": b"{}",
                                          "adapter/adapter_model.safetensors": b""})
    assert marked_adapter_dir(model) == (model / "adapter").resolve()
    (model / "adapter" / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(DataError, match=r"adapter_model\.bin"):
        marked_adapter_dir(model)
    (model / "adapter" / "adapter_model.safetensors").unlink()
    (model / "adapter" / "adapter_model.bin").unlink()
    with pytest.raises(DataError, match="safetensors"):
        marked_adapter_dir(model)
    outside = tmp_path / "weights.safetensors"
    outside.write_bytes(b"")
    (model / "adapter" / "adapter_model.safetensors").symlink_to(outside)
    with pytest.raises(DataError, match="outside"):
        marked_adapter_dir(model)


class _Payload:
    """Unpickling this writes a file: proof that a pickle ran."""

    def __init__(self, proof: Path) -> None:
        self.proof = proof

    def __reduce__(self):
        return (Path.write_text, (self.proof, "pickle ran"))


def test_a_pickled_adapter_never_reaches_torch_load(tmp_path: Path, model_dir: Path) -> None:
    from lmforge.serving.model.loading import load_model

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    proof = tmp_path / "proof"
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 2,
              "token_dim": 32, "num_transformer_submodules": 1, "num_attention_heads": 4, "num_layers": 2,
              "base_model_name_or_path": ".."}
    _marked(tmp_path, "adapter", {"adapter/adapter_config.json": json.dumps(config).encode(),
                                  "adapter/adapter_model.bin": pickle.dumps({"w": _Payload(proof)})})
    for load in (load_trained, lambda d: load_model(d, "cpu")):
        with pytest.raises(LmforgeError, match=r"adapter_model\.bin"):
            load(model)
    assert not proof.exists()


# ---------------------------------------------------------------- property-based: never a 5xx


def _json_values() -> st.SearchStrategy:
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)


# Strings a careless or hostile client sends: lone and paired surrogates (as JSON escapes), control
# characters, NULs, template syntax, huge and odd numbers.
ADVERSARIAL = st.sampled_from([
    '"a\\ud800b"', '"\\udfff"', '"\\ud83d\\udc0d"', '"\\u0000"', '"{{ 7*7 }}{% for x in y %}"', '"\\n\\r\\t"',
    '"<|im_end|>"', "1e400", "-1e400", "1e-400", str(10**40), str(-(10**40)), "-0", "0.0", "[]", "{}", "null",
    "true", '"yes"', '"' + "x" * 5000 + '"', "[" * 50 + "]" * 50,
])
FIELDS = ["prompt", "messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p",
          "top_k", "stop", "stream", "stream_options", "seed", "n", "logprobs", "top_logprobs", "echo", "user",
          "ignore_eos", "presence_penalty", "frequency_penalty", "best_of"]


def _body(fields: dict[str, str]) -> str:
    return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in fields.items()) + "}"


def _check(reply) -> None:
    assert reply.status_code < 500, reply.text
    if reply.status_code != 200 or not reply.headers["content-type"].startswith("text/event-stream"):
        assert reply.headers["content-type"].startswith("application/json"), reply.text
        body = reply.json()
        assert reply.status_code == 200 or body["error"]["message"]


PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                              HealthCheck.too_slow])


@PROPERTY
@given(path=st.sampled_from([COMPLETIONS, CHAT]), body=_json_values())
def test_random_json_bodies_never_get_a_5xx(client: TestClient, path: str, body: object) -> None:
    _check(client.post(path, content=json.dumps(body), headers={"content-type": "application/json"}))


@PROPERTY
@given(path=st.sampled_from([COMPLETIONS, CHAT]), raw=st.binary(max_size=64) | st.text(max_size=64))
def test_random_raw_bodies_never_get_a_5xx(client: TestClient, path: str, raw: bytes | str) -> None:
    _check(_raw(client, path, raw))


@PROPERTY
@given(fields=st.dictionaries(st.sampled_from(FIELDS), ADVERSARIAL, max_size=4),
       text=ADVERSARIAL, role=st.sampled_from(['"user"', '"system"', '"assistant"', '"tool"', "1"]))
def test_adversarial_fields_never_get_a_5xx(client: TestClient, fields: dict[str, str], text: str,
                                            role: str) -> None:
    completion = {"prompt": text, "max_tokens": "1", **fields}
    chat = {"messages": f'[{{"role": {role}, "content": {text}}}]', "max_tokens": "1", **fields}
    _check(_raw(client, COMPLETIONS, _body(completion)))
    _check(_raw(client, CHAT, _body(chat)))

