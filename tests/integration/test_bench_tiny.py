"""Every benchmark's ``--tiny`` mode, run as a user runs it: ``python -m bench.<group>.<name>`` from
the repository root, in a subprocess, offline, with its records sent to a temporary directory.

A tiny run takes a benchmark's real code path on a CPU in seconds (tiny models built from config,
a few steps or requests), so a refactor that breaks a benchmark fails here rather than on the next
GPU job. The assertions are on outcomes: exit status, the records written in the one format
(ARCHITECTURE.md, "Benchmarks"), and values that make sense. GPU-only parts (Triton kernels,
FlashAttention-4, cuDNN attention, int4/fp8 matmuls, CUDA graphs, profiles) are skipped by the
benchmarks on a CPU, and each says so; those tests check that too. Nothing may be written into
bench/results/ (the record of measured figures).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

FIELDS = ["bench", "metric", "value", "unit", "baseline", "baseline_value", "ratio", "device", "commit", "command",
          "date"]
RESULTS = REPO / "bench" / "results"


def _results_snapshot() -> dict[str, int]:
    return {p.name: p.stat().st_size for p in RESULTS.iterdir()}


@pytest.fixture(scope="module", autouse=True)
def results_untouched():
    """No tiny run may add a line to the record of measured figures."""
    before = _results_snapshot()
    yield
    assert _results_snapshot() == before


def bench(module: str, *args: str, out: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m <module> --tiny --out OUT ARGS`` from the repository root, offline; must exit 0.

    One intra-op thread: tiny tensors gain nothing from two, and on a shared 2-core machine the
    second thread's spinning made the same run two to three times slower."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", LMFORGE_BENCH_OUT=str(out),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", module, "--tiny", "--out", str(out), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{module} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def records(out: Path, name: str, module: str) -> dict[str, dict]:
    """The records of ``OUT/<name>.jsonl`` by metric, each checked against the one format."""
    rows = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
    assert rows, f"{name}: no records"
    for row in rows:
        assert list(row) == FIELDS, row
        assert row["bench"] == name
        assert isinstance(row["value"], (int, float)) and math.isfinite(row["value"]), row
        assert f"-m {module}" in row["command"] and "--out" not in row["command"], row["command"]
        if row["baseline_value"] and row["value"]:
            ratios = (row["value"] / row["baseline_value"], row["baseline_value"] / row["value"])
            assert any(math.isclose(row["ratio"], r, rel_tol=1e-3, abs_tol=1e-4) for r in ratios), row
    return {row["metric"]: row for row in rows}


# ---------------------------------------------------------------- train


@pytest.mark.slow  # four torchrun launches of the training engine on the CPU: ~1 minute on a busy 2-core machine
def test_train_scaling_tiny(tmp_path):
    """ddp and fsdp over 1 and 2 torchrun ranks (gloo): a rate per rank for each, and the efficiency of 2 against 1
    (its value is whatever a busy 2-core machine gives: only that it is the rates' quotient is checked)."""
    bench("bench.train.scaling", out=tmp_path, timeout=600)
    got = records(tmp_path, "train_scaling", "bench.train.scaling")
    for strategy in ("ddp", "fsdp"):
        one = got[f"tiny_{strategy}_w1_tok_s_per_gpu"]["value"]
        two = got[f"tiny_{strategy}_w2_tok_s_per_gpu"]
        assert one > 0 and two["value"] > 0 and two["baseline_value"] == one
        assert math.isclose(got[f"tiny_{strategy}_w2_scaling_efficiency"]["value"], two["value"] / one, rel_tol=1e-9)


@pytest.mark.slow  # ~45 s: every train variant on the CPU (make test stays under 10 minutes; CI runs make test-slow)
def test_train_gpu_tiny(tmp_path):
    bench("bench.train.gpu", "--only", "gpt2/plain", "gpt2/plain+fused_adamw", "gpt2/lmforge", "--gpt2-steps", "2",
          out=tmp_path)
    raw = [json.loads(line) for line in (tmp_path / "train_gpu_raw.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in raw] == ["gpt2/plain", "gpt2/plain+fused_adamw", "gpt2/lmforge"]
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in raw), raw
    assert math.isfinite(raw[-1]["loss_last"])  # the engine row trained
    got = records(tmp_path, "train_gpu", "bench.train.gpu")
    assert {"gpt2_124m_pretrain_tokens_per_s", "gpt2_124m_fused_adamw_alone_tokens_per_s",
            "gpt2_memory_estimate_gib"} <= set(got)
    assert got["gpt2_124m_pretrain_tokens_per_s"]["baseline"].startswith("gpt2/plain")


@pytest.mark.parametrize("args, cause, fix", [
    (["--gpt2", "model,fa5"], "unknown engine setting 'fa5'", "model,fa4,graphs"),
    (["--gpt2", "model,fa4,cudnn"], "sets speed.attention_backend twice", "keep one"),
    (["--only", "gpt2,llama_full"], "unknown group or row 'gpt2,llama_full'", "--only gpt2 llama_full"),
])
def test_train_gpu_bad_variant_names_the_fix(tmp_path, args, cause, fix):
    proc = subprocess.run([sys.executable, "-m", "bench.train.gpu", "--tiny", "--out", str(tmp_path), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    error, fix_line = proc.stderr.strip().splitlines()[-2:]
    assert error.startswith("error: ") and cause in error
    assert fix_line.strip().startswith("fix: ") and fix in fix_line
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_train_gpu_tiny_default_groups(tmp_path):
    """Every row of the default groups (compiled baselines and engine ablations included), a --gpt2
    row with pageable copies and a profile of the whole-model compile: minutes on a CPU."""
    bench("bench.train.gpu", "--gpt2-steps", "2", "--llama-steps", "2", "--gpt2", "blocks+pageable", "--profile",
          "model", out=tmp_path, timeout=900)
    raw = [json.loads(line) for line in (tmp_path / "train_gpu_raw.jsonl").read_text().splitlines()]
    assert len(raw) == 16 and all("error" not in r for r in raw), raw
    assert "gpt2/lmforge[blocks+pageable]" in {r["variant"] for r in raw}
    assert "idle between kernels" in (tmp_path / "profile_gpt2_lmforge_model_.txt").read_text()
    assert "llama_1.1b_lora_r16_tokens_per_s" in records(tmp_path, "train_gpu", "bench.train.gpu")


@pytest.mark.slow  # ~15 s (make test stays under 10 minutes; CI runs make test-slow)
def test_train_gpu_engine_tiny(tmp_path):
    bench("bench.train.gpu_engine", out=tmp_path)
    report = json.loads((tmp_path / "train_gpu_engine.json").read_text())
    assert report["device"] == "cpu" and report["corpus_chars"] > 0
    assert len(report["whole"]["curve"]) >= 2
    assert report["resumed"]["max_rel_loss_diff_vs_whole"] <= 1e-6  # the resumed run continues to the bit
    assert report["plain"]["max_rel_loss_diff_vs_whole"] <= 1e-6  # on a CPU both runs use the plain settings
    assert report["reload"]["agree"] == len(report["reload"]["probe_ids"]) > 0


def test_attention_tiny(tmp_path):
    proc = bench("bench.train.attention", out=tmp_path)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"shape"')]
    assert {(r["kernel"], "error" in r) for r in rows} == {("math", False), ("flash", False), ("cudnn", True),
                                                           ("fa4", True)}  # cuDNN and FA4 need a GPU
    got = records(tmp_path, "attention_gpu", "bench.train.attention")
    assert set(got) == {"gpt2_causal_attention_fwd_bwd_ms_flash", "llama_causal_attention_fwd_bwd_ms_flash"}
    assert all(r["value"] > 0 for r in got.values())


# ---------------------------------------------------------------- serve


def test_serve_gpu_tiny(tmp_path):
    proc = bench("bench.serve.gpu", "--phases", "check", "engine", "poisson", "hf", "nooverlap", "nographs", "unfused",
                 "eagerprefill", "int8", out=tmp_path)
    assert "needs a GPU, skipped on the CPU" in proc.stdout
    got = records(tmp_path, "serve_gpu", "bench.serve.gpu")
    assert got["logits_rel_err_prefill"]["value"] < 1e-4 and got["logits_rel_err_decode"]["value"] < 1e-4
    assert got["logits_rel_err_prefill_graph_last"]["value"] < 1e-4
    assert got["greedy_full_matches"]["value"] == 4
    assert got["engine_4_concurrent_tok_s"]["value"] > 0 and got["poisson_20rps_output_tok_s"]["value"] > 0
    assert got["engine_1_tok_s_vs_generate"]["baseline_value"] > 0
    assert got["engine_1_stream_itl_p50_ms"]["value"] > 0 and got["engine_1_stream_ttft_ms"]["value"] > 0
    assert {"engine_no_cuda_graphs_4_tok_s", "engine_no_overlap_4_tok_s", "engine_unfused_4_tok_s",
            "engine_eager_prefill_1_tok_s", "engine_eager_prefill_1_stream_ttft_ms", "engine_int8_4_tok_s"} <= set(got)
    assert got["int8_logits_rel_err"]["value"] < 0.05


def test_serve_quant_tiny(tmp_path):
    proc = bench("bench.serve.quant", "--train-s", "1", out=tmp_path)
    assert "needs a GPU, skipped on the CPU" in proc.stdout and "failed" not in proc.stdout
    got = records(tmp_path, "serve_gpu", "bench.serve.quant")
    base = got["quant_w_none_kv_bf16_heldout_ppl"]["value"]
    assert math.isclose(base, got["quant_ppl_transformers_bf16"]["value"], rel_tol=1e-3)  # the runner is exact
    assert math.isclose(got["quant_w_int8_kv_bf16_heldout_ppl"]["value"], base, rel_tol=0.05)
    assert got["quant_w_none_kv_fp8_kv_blocks_64mib"]["value"] > got["quant_w_none_kv_bf16_kv_blocks_64mib"]["value"]
    assert got["quant_w_int8_kv_bf16_4_tok_s"]["value"] > 0


@pytest.mark.slow  # a worker process that imports torch and transformers: ~20 s on a busy 2-core machine
def test_serve_tp_tiny(tmp_path):
    """The plain engine, the split machinery at one rank and two gloo ranks: the same greedy tokens."""
    bench("bench.serve.tp", out=tmp_path)
    got = records(tmp_path, "serve_tp", "bench.serve.tp")
    for world in ("tp1", "tp2"):
        assert got[f"tiny_{world}_greedy_agreement"]["value"] == 1.0
        assert got[f"tiny_{world}_4streams_tok_s"]["value"] > 0
        assert got[f"tiny_{world}_1stream_tok_s"]["baseline_value"] == got["tiny_plain_1stream_tok_s"]["value"]


@pytest.mark.slow  # ~5 s of CPU in the interpreter, 30 s on a busy 2-core machine
def test_serve_attention_tiny(tmp_path):
    """The split-K decode attention and the one-pass kernel in Triton's interpreter (the benchmark sets
    TRITON_INTERPRET=1 for --tiny) agree with the PyTorch attention; timing is GPU-only."""
    bench("bench.serve.attention", out=tmp_path)
    got = records(tmp_path, "serve_attention", "bench.serve.attention")
    assert set(got) == {"decode_attn_b1_ctx37_rel_err", "decode_attn_b3_ctx37_rel_err"}
    assert all(r["value"] < 1e-5 and r["baseline_value"] < 1e-5 for r in got.values()), got


def _checks(out: Path) -> dict[str, dict]:
    lines = [json.loads(line) for line in (out / "serve_gpu_check.jsonl").read_text().splitlines()]
    assert lines[0]["check"] == "setup" and lines[0]["device"] == "cpu"
    return {line["check"]: line for line in lines[1:]}


@pytest.mark.slow  # every check: about 75 s on 2 busy cores
def test_serve_gpu_check_tiny(tmp_path):
    proc = bench("bench.serve.gpu_check", out=tmp_path)
    checks = _checks(tmp_path)
    assert len(checks) == 16 and all(c["ok"] for c in checks.values()), checks
    assert checks["multi_lora"]["paths"]["backend"] == "paged"
    assert checks["fp8_kv"]["verdict"] == "pass" and checks["fp8_kv_prefix_refused"]["verdict"] == "refused"
    assert "all checks passed on" in proc.stderr


@pytest.mark.slow  # ~20 s; test_serve_gpu_check_tiny runs every check (make test stays under 10 minutes)
def test_serve_gpu_check_new_paths_tiny(tmp_path):
    """The checks of issue 19's serving paths, in make test (the whole run is in the slow tier)."""
    proc = bench("bench.serve.gpu_check", "--only", "fp8_kv_prefix_refused", "prefix_cache_lora", "structured_graphs",
                 "speculative_ngram", "runtime_adapters", out=tmp_path)
    checks = _checks(tmp_path)
    assert all(c["ok"] for c in checks.values()) and len(checks) == 5, checks
    assert checks["fp8_kv_prefix_refused"]["verdict"] == "refused"  # an expected refusal, never called a pass
    assert "serving.kv_cache.dtype: bf16" in checks["fp8_kv_prefix_refused"]["fix"]
    assert all(n > 0 for n in checks["prefix_cache_lora"]["cached_tokens"])  # the second run hit the cache
    assert checks["structured_graphs"]["constrained"] == 10 and not checks["structured_graphs"]["invalid"]
    assert checks["speculative_ngram"]["speculator"]["verify_steps"] > 0
    assert checks["runtime_adapters"]["reloaded"]["ok"] and checks["runtime_adapters"]["one_slot"]["ok"]
    assert "all checks passed on" in proc.stderr


def test_serve_gpu_check_unknown_check_names_the_fix(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.serve.gpu_check", "--tiny", "--out", str(tmp_path), "--only",
                           "multi_lora,int8_multi_lora"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "fix: give them as separate words: --only multi_lora int8_multi_lora" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # refused before any work or output


def test_serve_cpu_tiny(tmp_path):
    bench("bench.serve.cpu", "--no-onnx", out=tmp_path)
    got = records(tmp_path, "serve_cpu", "bench.serve.cpu")
    assert {"engine_1_stream_tok_s", "engine_4_stream_tok_s", "engine_int8_4_stream_tok_s"} <= set(got)
    assert not any("onnx" in metric for metric in got)
    assert got["engine_4_stream_tok_s"]["baseline"] == "transformers generate() (same run)"
    ppl = got["heldout_perplexity_int8"]
    assert math.isclose(ppl["value"], ppl["baseline_value"], rel_tol=0.05)


@pytest.mark.slow
def test_serve_cpu_tiny_onnx(tmp_path):
    """With the ONNX Runtime rows: the export of the tiny model alone takes several seconds."""
    pytest.importorskip("onnxruntime")
    bench("bench.serve.cpu", out=tmp_path)
    got = records(tmp_path, "serve_cpu", "bench.serve.cpu")
    assert got["engine_onnx_4_stream_tok_s"]["value"] > 0


def test_serve_lora_cpu_tiny(tmp_path):
    bench("bench.serve.lora_cpu", out=tmp_path)
    got = records(tmp_path, "serve_lora_cpu", "bench.serve.lora_cpu")
    assert set(got) == {"two_adapters_mixed_4_stream_tok_s", "base_requests_with_adapters_loaded_4_stream_tok_s"}
    assert all(r["value"] > 0 and r["baseline_value"] > 0 for r in got.values())


@pytest.mark.slow  # ~14 s (make test stays under 10 minutes; CI runs make test-slow)
def test_serve_load_tiny(tmp_path):
    proc = bench("bench.serve.load", out=tmp_path)
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith('{"rate"')))
    assert result["ok"] == 4 and result["errors"] == {}
    got = records(tmp_path, "serve_load", "bench.serve.load")
    assert got["http_20rps_output_tok_s"]["value"] > 0 and got["http_20rps_ttft_p50"]["value"] > 0


# Two server starts and a roll under load: 35 s of a make-test worker; the roll itself is test_rollout.py's (fast tier).
@pytest.mark.slow
def test_serve_roll_tiny(tmp_path):
    """The local deploy rolls to a second copy of the tiny model under load: same endpoint, no failed request."""
    proc = bench("bench.serve.roll", "--clients", "2", out=tmp_path, timeout=600)
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith('{"platform"')))
    assert (result["action"], result["same_endpoint"], result["failed_total"]) == ("rolled", True, 0)
    got = records(tmp_path, "serve_roll", "bench.serve.roll")
    assert got["local_p50_latency_during_roll_ms"]["baseline_value"] > 0
    assert got["local_failed_requests_during_roll"]["value"] == 0


@pytest.mark.slow  # ~18 s (make test stays under 10 minutes; CI runs make test-slow)
def test_serve_structured_tiny(tmp_path):
    """Constrained (json_schema, json_object) against free decoding on the same engine, and every
    finished constrained response validated in the run (an invalid one would exit 1)."""
    pytest.importorskip("xgrammar")
    proc = bench("bench.serve.structured", out=tmp_path)
    got = records(tmp_path, "serve_structured", "bench.serve.structured")
    for tag in ("4_streams", "json_object_4_streams"):
        assert got[f"serve_structured_{tag}_tokens_per_s"]["baseline_value"] > 0
        assert got[f"serve_structured_{tag}_tokens_per_s_vs_same_lengths"]["baseline_value"] > 0
        assert got[f"serve_structured_{tag}_decode_step_ms"]["value"] > 0
        assert got[f"serve_structured_{tag}_invalid_responses"]["value"] == 0
        stops, lengths = (got[f"serve_structured_{tag}_{v}_responses"]["value"] for v in ("stop", "length"))
        assert stops + lengths == 4
    # The schema bounds every string and number: even random weights reach the grammar's end.
    assert got["serve_structured_4_streams_stop_responses"]["value"] == 4
    assert got["serve_structured_4_streams_mask_fill_ms"]["value"] > 0
    assert got["serve_structured_4_streams_mask_apply_ms"]["value"] > 0
    assert got["serve_structured_1_stream_tokens_per_s"]["value"] > 0
    assert got["serve_structured_1_stream_invalid_responses"]["value"] == 0
    assert "INVALID" not in proc.stdout


def test_serve_prefix_tiny(tmp_path):
    """Prefix caching on against off in one run: a burst sharing a prefix, cold and warm, same tokens."""
    bench("bench.serve.prefix", out=tmp_path)
    got = records(tmp_path, "serve_prefix", "bench.serve.prefix")
    for case in ("cold", "warm"):
        ttft = got[f"prefix_32x128_{case}_mean_ttft_ms"]
        assert ttft["baseline"] == "prefix_caching off" and ttft["value"] > 0 and ttft["baseline_value"] > 0
        assert got[f"prefix_32x128_{case}_output_tok_s"]["baseline_value"] > 0
    # Cold: all but the first of 32 requests reuse the 128-token prefix (of 136 prompt tokens); warm: all.
    assert got["prefix_32x128_cold_hit_rate"]["value"] == pytest.approx(31 * 128 / (32 * 136))
    assert got["prefix_32x128_warm_hit_rate"]["value"] == pytest.approx(128 / 136)
    assert got["prefix_32x128_greedy_identical"]["value"] == 1.0
    # A burst admitted together prefills in one forward with caching (the others borrow the first one's
    # blocks as it writes them), in 3 without (32 x 136 tokens, 2,048 a forward).
    for case in ("cold", "warm"):
        forwards = got[f"prefix_32x128_{case}_prefill_forwards"]
        assert (forwards["value"], forwards["baseline_value"]) == (1, 3)


@pytest.mark.slow  # ~15 s: trains its copy model (make test stays under 10 minutes; CI runs make test-slow)
def test_serve_speculative_tiny(tmp_path):
    """A model trained in the run to copy (2 layers, grown to 3 by a pass-through layer, as the GPU run grows 2
    to 22), then n-gram speculation against plain decoding: it copies, the same tokens come out, most guesses
    are accepted on the copy workload, and back-off engages without a copy."""
    bench("bench.serve.speculative", "--layers", "3", "--train-layers", "2", out=tmp_path)
    got = records(tmp_path, "serve_speculative", "bench.serve.speculative")
    assert got["trained_layers"]["value"] == 2
    assert got["train_copy_accuracy"]["value"] > 0.9 and got["copy_copied_fraction"]["value"] > 0.9
    assert got["served_copy_accuracy"]["value"] == got["train_copy_accuracy"]["value"]  # the added layer changes nothing
    tok_s = got["copy_ngram_k4_tok_s"]
    assert tok_s["baseline"] == "plain decoding, same job" and tok_s["value"] > 0 and tok_s["baseline_value"] > 0
    assert got["copy_ngram_k4_greedy_identical"]["value"] == 1.0
    assert got["copy_ngram_k4_acceptance"]["value"] > 0.8
    assert got["copy_ngram_k4_tokens_per_verify"]["value"] > 3
    assert got["nocopy_ngram_k4_greedy_identical"]["value"] == 1.0
    assert got["nocopy_ngram_k4_verify_share"]["value"] < 1  # failed guesses backed off, or none were found
    assert got["nocopy_ngram_k4_launched_ahead"]["value"] > 0  # paused rounds overlap, as plain decoding


# ---------------------------------------------------------------- data


def test_collect_local_tiny(tmp_path):
    bench("bench.data.collect_local", out=tmp_path)
    got = records(tmp_path, "collect_local", "bench.data.collect_local")
    assert len(got) == 6 and all(r["value"] > 0 for r in got.values())


def test_collect_crawl_tiny(tmp_path):
    bench("bench.data.collect_crawl", out=tmp_path)
    got = records(tmp_path, "collect_crawl", "bench.data.collect_crawl")
    assert got["pages_per_s"]["value"] > 0
    assert got["requests_per_s"]["value"] <= got["requests_per_s"]["baseline_value"] * 1.1  # politeness holds


def test_curate_datatrove_tiny(tmp_path):
    bench("bench.data.curate_datatrove", out=tmp_path)
    got = records(tmp_path, "curate_datatrove", "bench.data.curate_datatrove")
    assert {"dedup_docs_per_s_per_core", "full_docs_per_s_per_core", "dedup_unique_docs_kept"} <= set(got)
    assert got["dedup_near_dup_recall"]["value"] >= 0.8


def test_train_dpo_gpu_tiny(tmp_path):
    """Our DPO + LoRA and, when trl is installed (the `bench` extra), TRL's DPOTrainer on the same pairs."""
    import importlib.util

    proc = bench("bench.train.dpo_gpu", out=tmp_path)
    raw = {r["row"]: r for r in map(json.loads, (tmp_path / "train_dpo_gpu_raw.jsonl").read_text().splitlines())}
    assert "error" not in raw["lmforge"] and raw["lmforge"]["tokens_per_s"] > 0, raw
    assert raw["lmforge"]["reference_s"] > 0  # DPO's reference pass is timed with our run
    got = records(tmp_path, "train_dpo_gpu", "bench.train.dpo_gpu")
    figure = got["tiny_llama_dpo_lora_b2_s64_tokens_per_s"]
    if importlib.util.find_spec("trl") is None:
        assert "TRL baseline skipped" in proc.stdout and figure["baseline_value"] is None
    else:
        assert "error" not in raw["trl_plain"], raw["trl_plain"]
        assert figure["baseline_value"] == raw["trl_plain"]["tokens_per_s"] > 0


# ---------------------------------------------------------------- platform


@pytest.mark.slow
def test_platform_overhead_tiny(tmp_path, monkeypatch, prefect_server):
    """The train task in a flow run on the session's Prefect server, on Ray with MLflow tracking, and
    the bare in-line loop on the same tokenized data: both timed from their history rows. About a
    minute on a 2-core machine (a local Ray and its worker start), so it runs in make test-slow."""
    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    proc = bench("bench.platform.overhead", out=tmp_path, timeout=600)
    runs = {r["run"]: r for r in map(json.loads, (line for line in proc.stdout.splitlines() if '"run"' in line))}
    assert set(runs) == {"bare", "prefect+ray+mlflow"}
    assert all(r["intervals_timed"] == 5 and r["steady_s_per_step"] > 0 for r in runs.values()), runs  # rows 1..6
    got = records(tmp_path, "platform_overhead", "bench.platform.overhead")
    assert set(got) == {"steady_s_per_step", "fixed_s", "added_fixed_s", "outside_steps_s", "added_outside_steps_s",
                        "wall_s"}
    assert got["steady_s_per_step"]["baseline_value"] > 0 and got["wall_s"]["value"] > 0
    assert got["added_fixed_s"]["value"] == pytest.approx(got["fixed_s"]["value"] - got["fixed_s"]["baseline_value"],
                                                          abs=1e-3)


def test_platform_storage_tiny(tmp_path):
    """Tokenized shards read from local disk and from moto's S3 server through the read cache, cold and warm."""
    bench("bench.platform.storage", out=tmp_path)
    got = records(tmp_path, "platform_storage", "bench.platform.storage")
    kinds = ("local", "store_cold", "store_warm")
    assert set(got) == {f"{kind}_{unit}_per_s" for kind in kinds for unit in ("MB", "rows")}
    assert all(r["value"] > 0 for r in got.values())
    assert got["store_cold_rows_per_s"]["baseline_value"] == got["local_rows_per_s"]["value"]
