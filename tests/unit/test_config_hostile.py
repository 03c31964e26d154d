"""Hostile and careless config files (issue 20, items 6-9): each fails fast with a ConfigError that
names the cause and the fix, and a partial block keeps its other defaults.
"""

from __future__ import annotations

import re
import time
import tracemalloc
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lmforge.cli import main
from lmforge.config import PipelineConfig, load_config
from lmforge.config.base import Section
from lmforge.config.loader import parse_config
from lmforge.core.errors import ConfigError

BILLION_LAUGHS = "\n".join([
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
    *(f"{chr(98 + i)}: &{chr(98 + i)} [{','.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)),
    "training: *i",
]) + "\n"


def _write(tmp_path, text: str | bytes, name: str = "c.yaml"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _refused(path) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        load_config(path)
    return err.value


# ---------------------------------------------------------------- 6: YAML bombs


def test_a_billion_laughs_fails_fast_with_little_memory(tmp_path):
    path = _write(tmp_path, BILLION_LAUGHS)
    tracemalloc.start()
    start = time.perf_counter()
    error = _refused(path)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 1.0 and peak < 20 * 2**20
    assert str(path) in error.cause and "alias" in error.cause and "anchors" in error.fix


def test_a_serving_config_file_gets_the_same_reader(tmp_path):
    from lmforge.serving.api import load_serving_config

    for text, cause in ((BILLION_LAUGHS, "alias"), (b"port: 8000\nhost: caf\xe9\n", "not UTF-8"),
                        ("port: 1\nport: 2\n", "port"), ("- 1\n- 2\n", "mapping")):
        with pytest.raises(ConfigError) as err:
            load_serving_config(_write(tmp_path, text, "serving.yaml"))
        assert cause in err.value.cause, err.value.cause


def test_a_recursive_alias_and_deep_nesting_are_refused(tmp_path):
    assert "recursive" in _refused(_write(tmp_path, "training: &t\n  seed: *t\n")).cause
    assert "nested" in _refused(_write(tmp_path, "training: " + "[" * 100_000 + "\n")).cause
    assert "nested" in _refused(_write(tmp_path, "training: " + "[" * 300 + "]" * 300 + "\n")).cause


def test_anchors_within_reason_still_work(tmp_path):
    path = _write(tmp_path, "training:\n  pretrain: &p {steps: 3, learning_rate: 0.01}\n  finetune: *p\n")
    assert load_config(path).training.finetune.steps == 3


def test_an_oversized_file_is_refused_unread(tmp_path):
    error = _refused(_write(tmp_path, "# filler\n" * 300_000))
    assert "MiB" in error.cause


def test_error_messages_never_render_a_huge_value(tmp_path):
    big = "x" * 500_000
    error = _refused(_write(tmp_path, f"model:\n  num_layers: {big}\n  ? {big}\n  : 1\n"))
    assert len(error.cause) < 2000 and "model.num_layers" in error.cause
    many = "\n".join(f"  k{i}: 1" for i in range(5000))
    assert len(_refused(_write(tmp_path, f"training:\n{many}\n")).cause) < 4000


# ---------------------------------------------------------------- 7: encodings


def test_a_file_that_is_not_utf8_names_the_file_and_the_fix(tmp_path, capsys):
    path = _write(tmp_path, "training:\n  seed: 1  # caf\xe9\n".encode("latin-1"))
    error = _refused(path)
    assert str(path) in error.cause and "UTF-8" in error.cause and "line 2" in error.cause
    assert "UTF-8" in error.fix
    assert main(["config", "show", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "UTF-8" in err
    utf16 = _write(tmp_path, "training:\n  seed: 1\n".encode("utf-16"), "u16.yaml")
    assert "UTF-8" in _refused(utf16).cause


def test_a_utf8_byte_order_mark_is_fine(tmp_path):
    assert load_config(_write(tmp_path, b"\xef\xbb\xbftraining:\n  seed: 4\n")).training.seed == 4


def test_a_directory_is_not_a_config(tmp_path):
    assert "not a file" in _refused(tmp_path).cause


# ---------------------------------------------------------------- 8: absurd values, duplicate keys


@pytest.mark.parametrize(("yaml_text", "key"), [
    ("training:\n  pretrain: {steps: 100000000000000000000}\n", "training.pretrain.steps"),
    ("model:\n  num_layers: 1000000\n", "model.num_layers"),
    ("model:\n  hidden_size: 1048576\n  num_heads: 1\n  num_kv_heads: 1\n", "model.hidden_size"),
    ("training:\n  finetune: {batch_size: 1000000000}\n", "training.finetune.batch_size"),
    ("training:\n  placement: {num_workers: 10000}\n", "training.placement.num_workers"),
    ("training:\n  pretrain: {steps: 100000000000}\n", "training.pretrain.steps"),
    ("training:\n  pretrain: {learning_rate: .inf}\n", "training.pretrain.learning_rate"),
    ("serving:\n  scheduler: {max_batch_size: 1000000}\n", "serving.scheduler.max_batch_size"),
])
def test_absurd_values_name_the_key_and_the_allowed_range(tmp_path, yaml_text, key):
    cause = _refused(_write(tmp_path, yaml_text)).cause
    assert f"'{key}'" in cause
    assert re.search(r"allowed: (at least|at most|from|above|below) ", cause) or "finite" in cause, cause


def test_a_float_is_refused_where_an_integer_is_expected():
    for value in (1e20, 5.0, float("nan")):
        with pytest.raises(ConfigError, match=r"'training\.pretrain\.steps'.*whole number"):
            parse_config({"training": {"pretrain": {"steps": value}}})
    assert parse_config({"training": {"pretrain": {"learning_rate": 1}}}).training.pretrain.learning_rate == 1.0


def test_a_duplicate_key_names_the_key_and_its_line(tmp_path):
    error = _refused(_write(tmp_path, "training:\n  seed: 1\n  method: full\n  seed: 2\n"))
    assert "'seed'" in error.cause and "line 4" in error.cause and "line 2" in error.cause
    assert "duplicate" in error.cause
    assert "'training'" in _refused(_write(tmp_path, "training: {}\nmodel: {}\ntraining: {}\n")).cause


def test_merge_keys_may_repeat_a_merged_key(tmp_path):
    text = "training:\n  pretrain:\n    <<: &base {steps: 3, learning_rate: 0.01}\n    steps: 4\n"
    assert load_config(_write(tmp_path, text)).training.pretrain.steps == 4


# ---------------------------------------------------------------- 9: partial blocks keep their defaults


def test_a_partial_phase_keeps_that_phases_defaults():
    defaults = PipelineConfig().training
    training = parse_config({"training": {"pretrain": {"steps": 5}, "finetune": {"steps": 3}}}).training
    assert training.pretrain == defaults.pretrain.model_copy(update={"steps": 5})
    assert training.finetune == defaults.finetune.model_copy(update={"steps": 3})
    assert training.finetune.seq_len == 64 and training.finetune.warmup_steps == defaults.finetune.warmup_steps


def _blocks(model: type[Section], default: Section, path: tuple[str, ...] = ()):
    """(path, default value) of every nested block (a Section-typed field) under ``model``."""
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, Section):
            value = getattr(default, name)
            yield (*path, name), value
            yield from _blocks(kind, value, (*path, name))


def _nest(path: tuple[str, ...], leaf: dict[str, Any]) -> dict[str, Any]:
    for part in reversed(path):
        leaf = {part: leaf}
    return leaf


BLOCKS = list(_blocks(PipelineConfig, PipelineConfig()))


@pytest.mark.parametrize(("path", "default"), BLOCKS, ids=[".".join(p) for p, _ in BLOCKS])
def test_every_nested_block_keeps_its_defaults_when_one_key_is_given(path, default):
    for key in type(default).model_fields:
        given_one = {key: default.model_dump(mode="json")[key]}
        config = parse_config(_nest(path, given_one))
        block = config
        for part in path:
            block = getattr(block, part)
        assert block == default, f"{'.'.join(path)}: giving only {key} changed the others"


# ---------------------------------------------------------------- property-based: never a crash

_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
_keys = st.sampled_from([*PipelineConfig.model_fields, "pretrain", "finetune", "steps", "method", "preference",
                         "finetune_method", "placement", "num_workers", "lora", "sources", "kind"]) | st.text(max_size=8)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4),
                       max_leaves=20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _values, max_size=5))
@example({"training": {"method": "dpo", "preference": 5}})
@example({"training": {"finetune_method": ["none"]}})
@example({"training": {"pretrain": [1]}, "curation": {"preferences": "x"}})
def test_random_overrides_never_crash(overrides):
    try:
        load_config(None, overrides)
    except ConfigError as exc:
        assert exc.cause and exc.fix and len(exc.cause) < 10_000


_yaml_pieces = st.sampled_from(["training:", "model:", "  ", "    ", "\n", "- ", "&a ", "*a", "<<: ", "{", "}", "[",
                                "]", ": ", "steps", "1.0e+20", "seed: 1", "\t", "!!binary", "!!python/object", "'",
                                '"', "#", "? ", "pretrain:", "---\n", "...", "\x00", "é", "1e20", "&b [*a, *a]"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_yaml_pieces, max_size=30).map("".join) | st.text(max_size=200) | st.binary(max_size=200))
def test_random_yaml_documents_never_crash(tmp_path_factory, document):
    path = tmp_path_factory.mktemp("yaml") / "c.yaml"
    path.write_bytes(document if isinstance(document, bytes) else document.encode("utf-8", "surrogatepass"))
    try:
        load_config(path)
    except ConfigError as exc:
        assert exc.cause and exc.fix


def test_safe_dump_of_the_defaults_loads_back(tmp_path):
    dumped = yaml.safe_dump(PipelineConfig().model_dump(mode="json"))
    assert load_config(_write(tmp_path, dumped)) == PipelineConfig()
