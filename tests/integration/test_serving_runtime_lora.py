"""LoRA adapters loaded and unloaded while serving (api/admin.py, adapters/runtime.py, adapters/sources.py).

One tiny Llama served on loopback with one device slot (``serving.lora.max_loras: 1``) and room for two
adapters in CPU memory; two LoRA adapters trained here for a few steps (the fixtures of
test_serving_multi_lora.py). Through the official ``openai`` client and httpx: an adapter loaded at run
time (from a directory under the allowed root, or from the MLflow registry on SQLite) answers exactly the
greedy tokens of the same adapter served from start-up; alternating two adapters over one slot swaps
them LRU and each keeps its output; unload frees its place; unload in use, a path outside the roots, a
rank that does not fit and every auth failure get OpenAI-shaped errors naming the field; a name loaded
again with other weights never meets the old adapter's prefix-cache blocks.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from helpers import PROMPTS, make_tiny_model_dir, serve
from test_serving_multi_lora import CFG, GREEDY, train_lora

from lmforge.config.base import updated
from lmforge.serving.api.server import create_app
from lmforge.serving.engine import Engine

SENTENCE_A = "the cat sat on the mat and looked at the dog"
SENTENCE_B = "json dumps writes an object as a string of text"
ADMIN = "admin-secret"
# A prompt of several full 4-token blocks: the prefix cache keeps them.
LONG = "json.dumps serializes an object to a string, and json.loads reads it back into an object"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runtime-lora")
    base = make_tiny_model_dir(root / "base")
    allowed = root / "allowed"
    a = train_lora(base, allowed / "lora-a", 1, SENTENCE_A, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    b = train_lora(base, allowed / "lora-b", 2, SENTENCE_B, r=8, lora_alpha=16,
                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return {"base": base, "allowed": allowed, "a": a, "b": b, "root": root}


@pytest.fixture(scope="module")
def expected(dirs: dict[str, Path]) -> dict[str, list[list[int]]]:
    """Greedy tokens of the base and of each adapter served from start-up (serving.adapters)."""
    cfg = updated(CFG, adapters={"a": str(dirs["a"]), "b": str(dirs["b"])})
    engine = Engine.load(dirs["base"], device="cpu", cfg=cfg)
    try:
        prompts = [*PROMPTS, LONG]
        return {name or "base": [list(c.token_ids) for c in engine.generate(prompts, GREEDY,
                                                                             adapters=[name] * len(prompts))]
                for name in (None, "a", "b")}
    finally:
        engine.close()


@pytest.fixture(scope="module")
def server(dirs: dict[str, Path]) -> Iterator[tuple[Engine, str]]:
    cfg = updated(CFG, lora={"max_loras": 1, "max_cpu_loras": 2, "max_rank": 8, "adapter_roots": [str(dirs["allowed"])]})
    engine = Engine.load(dirs["base"], device="cpu", cfg=cfg)
    os.environ["LMFORGE_ADMIN_KEY"] = ADMIN  # read when the app is made
    try:
        app = create_app(engine, "base", cfg, api_key="user-key")
    finally:
        del os.environ["LMFORGE_ADMIN_KEY"]
    with serve(app) as (url, _):
        yield engine, url
    engine.close()


def admin(url: str, route: str, key: str | None = ADMIN, **body) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/v1/{route}", json=body, headers=headers, timeout=60)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="user-key", max_retries=0, timeout=60)


def greedy(url: str, model: str, prompt: str) -> openai.types.Completion:
    return client(url).completions.create(model=model, prompt=prompt, max_tokens=GREEDY.max_tokens, temperature=0,
                                          extra_body={"ignore_eos": True})


def ids(engine: Engine, out: openai.types.Completion) -> list[int]:
    return engine.tokenizer.encode(out.choices[0].text, add_special_tokens=False)


def text_of(engine: Engine, tokens: list[int]) -> str:
    return engine.tokenizer.decode(tokens)


@pytest.fixture()
def clean(server: tuple[Engine, str]) -> Iterator[tuple[Engine, str]]:
    """The server with no adapter loaded before and after the test."""
    engine, url = server
    yield engine, url
    for name in list(engine.adapters):
        assert admin(url, "unload_lora_adapter", lora_name=name).status_code == 200


def test_load_answers_like_startup_is_listed_and_unload_frees_it(clean, dirs, expected) -> None:
    engine, url = clean
    loaded = admin(url, "load_lora_adapter", lora_name="sql", lora_path=str(dirs["a"]))
    assert loaded.status_code == 200, loaded.text
    assert loaded.json() == {"object": "lora_adapter", "id": "sql", "parent": "base", "loaded": True}
    models = client(url).models.list().data
    assert [(m.id, getattr(m, "parent", None)) for m in models] == [("base", None), ("sql", "base")]
    for i, prompt in enumerate(PROMPTS):
        out = greedy(url, "sql", prompt)
        assert out.model == "sql" and out.choices[0].text == text_of(engine, expected["a"][i])
    assert expected["a"] != expected["base"]
    # CPU memory holds two adapters' weights (max_cpu_loras 2): a third load drops the least recently used
    # one off the device (b; sql sits in the slot), which is read again from its directory when asked for.
    assert admin(url, "load_lora_adapter", lora_name="b", lora_path=str(dirs["b"])).status_code == 200
    assert admin(url, "load_lora_adapter", lora_name="c", lora_path=str(dirs["a"])).status_code == 200
    pool = engine.backend.lora
    assert len(pool.in_memory) == 2 and pool.loaded[engine.adapters["b"]].weights == {}
    rereads = pool.rereads
    assert greedy(url, "b", PROMPTS[1]).choices[0].text == text_of(engine, expected["b"][1])
    assert pool.rereads == rereads + 1 and len(pool.in_memory) == 2
    gone = admin(url, "unload_lora_adapter", lora_name="sql")
    assert gone.status_code == 200 and gone.json()["loaded"] is False
    assert [m.id for m in client(url).models.list().data] == ["base", "b", "c"]
    with pytest.raises(openai.NotFoundError) as refused:
        greedy(url, "sql", PROMPTS[0])
    assert refused.value.code == "model_not_found"
    again = admin(url, "unload_lora_adapter", lora_name="nope")
    assert again.status_code == 404 and again.json()["error"]["param"] == "lora_name"


def test_two_adapters_over_one_slot_swap_lru_and_keep_their_outputs(clean, dirs, expected) -> None:
    engine, url = clean
    for name in ("a", "b"):
        assert admin(url, "load_lora_adapter", lora_name=name, lora_path=str(dirs[name])).status_code == 200
    pool = engine.backend.lora
    swaps = pool.swaps
    for name in ("a", "b", "a", "b"):  # one slot: every request swaps the other adapter out
        out = greedy(url, name, PROMPTS[1])
        assert out.choices[0].text == text_of(engine, expected[name][1]), name
    assert pool.swaps - swaps == 4
    # Submitted together: a waits for b's sequences to leave the slot (never fails), each gets its own output.
    names = ["a", "b", None, "a", "b"]
    results = engine.generate([PROMPTS[1]] * len(names), GREEDY, adapters=names)
    for name, result in zip(names, results):
        assert list(result.token_ids) == expected[name or "base"][1], name


def test_weights_changed_at_their_source_are_not_read_again(clean, dirs) -> None:
    """An adapter dropped from CPU memory whose directory now holds other weights answers 503 naming model
    (the prefix cache keys blocks by the load); loaded again, it serves the new weights."""
    engine, url = clean
    moving = dirs["allowed"] / "moving"
    shutil.copytree(dirs["a"], moving)
    for name, path in (("m", moving), ("a", dirs["a"]), ("b", dirs["b"])):  # m is dropped: least recently used
        assert admin(url, "load_lora_adapter", lora_name=name, lora_path=str(path)).status_code == 200
    assert engine.backend.lora.loaded[engine.adapters["m"]].weights == {}
    shutil.rmtree(moving)
    shutil.copytree(dirs["b"], moving)
    with pytest.raises(openai.APIStatusError) as changed:
        greedy(url, "m", PROMPTS[1])
    error = changed.value.body
    assert changed.value.status_code == 503 and isinstance(error, dict), error
    assert error["param"] == "model" and error["code"] == "adapter_unavailable" and "changed" in error["message"]
    assert engine.adapters and "m" in engine.adapters  # still loaded: unload and load it again to take the new weights
    shutil.rmtree(moving)


def test_unload_of_an_adapter_in_use_is_refused_naming_lora_name(clean, dirs) -> None:
    engine, url = clean
    assert admin(url, "load_lora_adapter", lora_name="a", lora_path=str(dirs["a"])).status_code == 200
    # The sink blocks the engine thread at the request's first token: the request is surely running.
    first, go_on, done = threading.Event(), threading.Event(), threading.Event()

    def sink(delta) -> None:
        first.set()
        go_on.wait(30)
        if isinstance(delta, BaseException) or delta.completion is not None:
            done.set()

    engine.submit(engine.encode(PROMPTS[1]), GREEDY, sink, adapter="a")
    assert first.wait(30)
    try:
        busy = admin(url, "unload_lora_adapter", lora_name="a")
        assert busy.status_code == 400, busy.text
        error = busy.json()["error"]
        assert error["param"] == "lora_name" and error["code"] == "adapter_in_use" and "'a'" in error["message"]
    finally:
        go_on.set()
    assert done.wait(30)
    assert admin(url, "unload_lora_adapter", lora_name="a").status_code == 200


def test_a_reused_name_never_meets_the_old_adapters_cached_blocks(clean, dirs, expected) -> None:
    engine, url = clean
    same = dirs["allowed"] / "same-path"  # name and path both reused below: only the load tells them apart
    shutil.copytree(dirs["a"], same)
    assert admin(url, "load_lora_adapter", lora_name="x", lora_path=str(same)).status_code == 200
    greedy(url, "x", LONG)
    warm = greedy(url, "x", LONG)  # the same adapter and prompt: its blocks come from the cache
    assert warm.usage.prompt_tokens_details.cached_tokens > 0
    assert warm.choices[0].text == text_of(engine, expected["a"][-1])
    assert admin(url, "unload_lora_adapter", lora_name="x").status_code == 200
    shutil.rmtree(same)
    shutil.copytree(dirs["b"], same)
    assert admin(url, "load_lora_adapter", lora_name="x", lora_path=str(same)).status_code == 200
    fresh = greedy(url, "x", LONG)  # same name, same slot, other weights: nothing cached may be reused
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    assert fresh.choices[0].text == text_of(engine, expected["b"][-1])
    assert greedy(url, "x", LONG).usage.prompt_tokens_details.cached_tokens > 0  # its own blocks, though


def test_auth_roots_and_fit_refusals(clean, dirs, tmp_path: Path) -> None:
    engine, url = clean
    body = {"lora_name": "a", "lora_path": str(dirs["a"])}
    for key in (None, "wrong", "user-key"):  # no key, a wrong one, and the users' API key: all 401
        refused = admin(url, "load_lora_adapter", key=key, **body)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    outside = admin(url, "load_lora_adapter", lora_name="o", lora_path=str(dirs["base"]))
    assert outside.status_code == 400 and outside.json()["error"]["param"] == "lora_path"
    assert "outside the allowed adapter roots" in outside.json()["error"]["message"]
    climb = admin(url, "load_lora_adapter", lora_name="o", lora_path=str(dirs["allowed"] / ".." / "base"))
    assert climb.status_code == 400 and "outside" in climb.json()["error"]["message"]
    link = dirs["allowed"] / "link"
    link.symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "adapter_config.json").write_text((dirs["a"] / "adapter_config.json").read_text())
    linked = admin(url, "load_lora_adapter", lora_name="o", lora_path=str(link))
    assert linked.status_code == 400 and linked.json()["error"]["param"] == "lora_path"
    # Rank 16 does not fit slots of max_rank 8.
    from safetensors.torch import load_file, save_file

    wide = dirs["allowed"] / "wide"
    wide.mkdir()
    (wide / "adapter_config.json").write_text((dirs["a"] / "adapter_config.json").read_text())
    tensors = load_file(str(dirs["a"] / "adapter_model.safetensors"))
    save_file({k: torch.zeros(16, v.shape[1]) if "lora_A" in k else torch.zeros(v.shape[0], 16)
               for k, v in tensors.items()}, str(wide / "adapter_model.safetensors"))
    misfit = admin(url, "load_lora_adapter", lora_name="w", lora_path=str(wide))
    assert misfit.status_code == 400 and misfit.json()["error"]["code"] == "adapter_does_not_fit"
    assert "rank 16" in misfit.json()["error"]["message"] and "max_rank" in misfit.json()["error"]["message"]
    assert admin(url, "load_lora_adapter", lora_name="base", lora_path=str(dirs["a"])).status_code == 400
    assert engine.adapters == {}
    # A server without an admin key refuses the routes, naming the variable to set.
    with serve(create_app(engine, "base", engine.cfg)) as (other, _):
        off = admin(other, "load_lora_adapter", **body)
    assert off.status_code == 403 and "LMFORGE_ADMIN_KEY" in off.json()["error"]["message"]


def test_load_from_the_registry_by_alias(clean, dirs, expected, tmp_path: Path, monkeypatch) -> None:
    from lmforge.core.workspace import Workspace
    from lmforge.tracking.mlflow_tracker import mlflow_client

    engine, url = clean
    ws = Workspace.from_env(tmp_path / "home").ensure()
    monkeypatch.setenv("LMFORGE_HOME", str(ws.home))  # the server resolves models:/ in this workspace
    mlflow = mlflow_client(ws)
    run = mlflow.create_run(mlflow.create_experiment("adapters"))
    mlflow.log_artifacts(run.info.run_id, str(dirs["b"]), "adapter")
    mlflow.create_registered_model("sql-lora")
    version = mlflow.create_model_version("sql-lora", f"{run.info.artifact_uri}/adapter", run.info.run_id)
    mlflow.set_registered_model_alias("sql-lora", "champion", version.version)
    loaded = admin(url, "load_lora_adapter", lora_name="reg", lora_path="models:/sql-lora@champion")
    assert loaded.status_code == 200, loaded.text
    assert greedy(url, "reg", PROMPTS[1]).choices[0].text == text_of(engine, expected["b"][1])
    missing = admin(url, "load_lora_adapter", lora_name="r2", lora_path="models:/sql-lora@nope")
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "lora_path"
