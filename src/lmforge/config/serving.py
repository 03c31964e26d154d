"""The ``serving`` section: how ``lmforge serve`` and the deploy stage run the inference server.

Grouped by the part of the server that reads it: ``server`` (the HTTP process: bind address,
timeouts, exposure), ``scheduler`` (the running batch, the waiting queue, chunked prefill),
``kv_cache`` (the paged cache's budget, block size and dtype), ``runtime`` (which backend, on
which device, with how many threads, graphs and quantization) and ``limits`` (what one request may
ask: body bytes, prompt tokens, stop strings, logprobs), ``speculative`` (proposed tokens verified in one
forward: n-gram lookup or a draft model), ``lora`` (LoRA adapters loaded while serving: device slots, the CPU
pool, allowed roots). Request defaults (``max_new_tokens``),
``adapters`` and the deploy stage's ``probe_prompt`` and ``platform`` stay at the top; ``ray`` sizes the
Ray Serve application of ``platform: ray`` (replicas or autoscaling, resources per replica, the proxy's
port, the cluster). Every field is also valid in
the ``--serving-config`` file of ``python -m lmforge.serving``; the flat keys of older files are
listed in ``ServingConfig.moved_keys``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from lmforge.config.base import Section


class ServerConfig(Section):
    """The HTTP server process: where it listens, how long it may take to start and to drain."""

    host: str = Field("127.0.0.1", description="Bind address; loopback by default.")
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port.")
    startup_timeout_s: float = Field(120, gt=0, le=86_400, description="How long the deploy stage waits for the server to start.")
    drain_timeout_s: float = Field(30, ge=0, le=86_400, description="On shutdown, how long running requests may finish.")
    allow_unauthenticated_remote: bool = Field(
        False,
        description="Allow binding beyond loopback without an API key (LMFORGE_API_KEY). Off: such a bind is refused.",
    )
    admin_key_env: str = Field(
        "LMFORGE_ADMIN_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding the admin key that POST /v1/load_lora_adapter and "
        "/v1/unload_lora_adapter require ('Authorization: Bearer <key>'); unset, those routes are refused. "
        "The API key does not open them: it is every client's key, and loading reads the server's disk.",
    )


class SchedulerConfig(Section):
    """Which requests run together: the running batch, the waiting queue and chunked prefill."""

    max_batch_size: int = Field(8, gt=0, le=4096, description="Most requests decoded together (the running batch).")
    max_queue: int = Field(
        64, ge=0, le=1_000_000, description="Requests that may wait for a batch slot; beyond it the server answers 429."
    )
    max_prefill_tokens: int = Field(
        2048, ge=16, le=1 << 21, description="Prompt tokens prefilled per engine step (chunked prefill keeps streams moving)."
    )
    max_model_len: int | None = Field(
        None, gt=0, le=1 << 21, description="Cap on prompt + completion tokens; default the model's context window."
    )


class KVCacheConfig(Section):
    """The paged engine's KV cache: its memory budget, block size, storage dtype and prefix caching."""

    memory_mb: float | None = Field(
        None,
        gt=0,
        le=1 << 24,  # 16 TiB
        description="KV cache memory budget in MiB (paged engine). Default: on CUDA half the device memory "
        "free after loading the weights; on CPU room for scheduler.max_batch_size full-length sequences, at "
        "most 1024.",
    )
    block_size: int = Field(16, ge=1, le=256, description="Tokens per KV cache block.")
    dtype: Literal["auto", "bf16", "fp8"] = Field(
        "auto",
        description="KV cache storage (paged engine): 'auto' the model's dtype; 'fp8' float8 e4m3 (half the bytes "
        "of bf16, so twice the tokens in the same memory_mb; CPU, or CUDA with compute capability >= 8.9).",
    )
    prefix_caching: bool = Field(
        True,
        description="Automatic prefix caching (paged engine): full KV blocks of prompts are kept by content "
        "(per adapter) and reused by later requests that start with the same tokens, until the cache needs the "
        "room; false recomputes every prompt (for A/B benchmarks).",
    )


class RuntimeConfig(Section):
    """Which backend decodes, on which device, with how many threads, graphs and what weight precision."""

    engine: Literal["auto", "paged", "hf", "onnx"] = Field(
        "auto",
        description="'paged': our decode loop over a paged KV cache (Llama-family models); 'hf': the "
        "model's own forward with a dense cache (any causal LM); 'onnx': ONNX Runtime on CPU over a directory "
        "written by `lmforge export-onnx`; 'auto': onnx for such a directory, else paged when the model supports it.",
    )
    device: str | None = Field(None, description="'cuda', 'cuda:1' or 'cpu'; default CUDA when present.")
    cpu_threads: int | None = Field(
        None, ge=1, le=4096, description="torch threads of the engine on a CPU; default one for small models (hidden size "
        "under 1024, where waking threads costs more than they save) and one per core otherwise.",
    )
    onnx_threads: int | None = Field(None, ge=1, le=4096, description="ONNX Runtime intra-op threads; default one per core.")
    cuda_graphs: bool = Field(True, description="Capture the decode step as CUDA graphs (paged engine on CUDA).")
    overlap_decode: bool = Field(
        True, description="Launch the next decode step before the previous step's tokens are turned into text "
        "(where the backend can); off only to measure what the overlap is worth.",
    )
    fused_attention: bool = Field(
        True, description="Decode and verify steps rotate their queries and store their keys and values inside the "
        "attention kernel (paged engine on CUDA), not in a kernel of their own; off only to measure what that is worth.",
    )
    quantization: Literal["none", "int8", "int4", "fp8"] = Field(
        "none",
        description="Weights of the decoder's linear layers at load (lmforge.serving.quant): 'int8' weight-only "
        "per output channel (CPU and CUDA); 'int4' weight-only, groups of 128 (CUDA); 'fp8' e4m3 weights and "
        "per-row dynamic fp8 activations (CUDA, compute capability >= 8.9). bench/RESULTS.md lists each one's "
        "speed and perplexity change.",
    )


class RayAutoscalingConfig(Section):
    """Ray Serve autoscaling on queue depth: replicas follow the requests in flight per replica."""

    min_replicas: int = Field(1, ge=1, le=1024, description="Fewest replicas (at least one, so the route always answers).")
    max_replicas: int = Field(4, ge=1, le=1024, description="Most replicas.")
    target_ongoing_requests: float = Field(
        2.0, gt=0, le=100_000, description="Requests in flight (running and queued) per replica that Serve aims for: "
        "more than this on average adds replicas, fewer removes them.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> RayAutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})")
        return self


class RayServeConfig(Section):
    """The Ray Serve platform (``serving.platform: ray``): replicas of our server behind Serve's HTTP proxy.

    Each replica runs the same engine and OpenAI-compatible app as ``lmforge serve``; the proxy listens on
    ``serving.server.host`` at ``http_port``, which stays the same while a new model version rolls out."""

    address: str | None = Field(
        None, description="Ray cluster to deploy on ('host:port' or ray://...); default RAY_ADDRESS, else the Ray head "
        "of `lmforge stack up` in this workspace. The cluster must outlive the deploy command: it keeps the replicas.",
    )
    app_name: str = Field("lmforge", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="The Serve application's name.")
    http_port: int = Field(8000, ge=1, le=65535, description="The Serve HTTP proxy's port: the stable endpoint. Fixed "
                           "when Serve first starts on the cluster.")
    num_replicas: int = Field(1, ge=1, le=1024, description="Replicas when autoscaling is not set.")
    autoscaling: RayAutoscalingConfig | None = Field(
        None, description="Scale replicas on queue depth between min_replicas and max_replicas instead of num_replicas.",
    )
    num_cpus: float = Field(1.0, ge=0, le=4096, description="CPUs Ray reserves per replica.")
    num_gpus: float = Field(0.0, ge=0, le=64, description="GPUs Ray reserves per replica (fractions share one GPU).")
    max_ongoing_requests: int | None = Field(
        None, ge=1, le=100_000, description="Requests Serve sends one replica at a time; default "
        "scheduler.max_batch_size, so the rest wait in Serve's queue, which autoscaling reads.",
    )
    max_surge_percent: int = Field(
        100, ge=1, le=100, description="During a roll, new replicas Serve may start beyond the target (percent of it, "
        "rounded up): old replicas keep serving until their replacements loaded and passed the health check.",
    )
    health_check_period_s: float = Field(2.0, gt=0, le=3600, description="Seconds between Serve's replica health checks.")
    health_check_timeout_s: float = Field(30.0, gt=0, le=3600, description="A health check slower than this fails.")

    @model_validator(mode="after")
    def _one_way_to_size(self) -> RayServeConfig:
        if self.autoscaling is not None and "num_replicas" in self.model_fields_set:
            raise ValueError("set either num_replicas (a fixed count) or autoscaling (min/max replicas), not both")
        return self


class LimitsConfig(Section):
    """What one request may ask of the server, checked before any work is done for it.

    Each refusal is an OpenAI-shaped 4xx naming the key to raise; none of them grows the server's memory.
    """

    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, le=1024**3,
        description="Largest request body in bytes; a larger one gets 413 from its Content-Length, or as soon as "
        "that many bytes have arrived, before it is parsed.",
    )
    max_prompt_tokens: int | None = Field(
        None, gt=0, le=10_000_000, description="Most prompt tokens (a completion's prompt or a rendered chat); "
        "default the context window (scheduler.max_model_len or the model's).",
    )
    max_chars_per_token: int = Field(
        32, ge=1, le=1_000_000, description="A prompt longer than max_prompt_tokens x this many characters is "
        "refused before it is tokenized (tokenizing megabytes takes seconds): no token of ordinary text is that long.",
    )
    max_stop: int = Field(4, ge=0, le=64, description="Most `stop` strings per request (OpenAI allows 4).")
    max_stop_chars: int = Field(256, ge=1, le=100_000, description="Longest `stop` string, in characters.")
    max_logprobs: int = Field(
        20, ge=0, le=20, description="Most alternatives per token: completions `logprobs`, chat `top_logprobs`."
    )
    max_n: int = Field(
        8, ge=1, le=128, description="Most sequences one request may have decoded: its `n` choices, and on completions "
        "its `best_of` candidates (each is a row of the batch; the prompt's full KV blocks are shared).",
    )


class SpeculativeConfig(Section):
    """Speculative decoding (paged engine): cheap proposals of the next tokens, verified by the model in one
    forward with exact rejection sampling, so outputs keep the model's distribution (greedy: the same tokens)."""

    method: Literal["none", "ngram", "draft"] = Field(
        "none",
        description="'ngram': propose the tokens that followed the latest earlier match of the last n tokens in the "
        "prompt and output so far (no model; pays off when the output copies the prompt, as code edits do); "
        "'draft': a small model sharing the tokenizer (draft_model) proposes them; 'none': off.",
    )
    num_tokens: int = Field(4, ge=1, le=16, description="Tokens proposed per step (k); one forward verifies k + 1.")
    ngram_min: int = Field(1, ge=1, le=32, description="Shortest suffix (tokens) the n-gram proposer matches.")
    ngram_max: int = Field(4, ge=1, le=32, description="Longest suffix (tokens) the n-gram proposer matches; the "
                           "longest match found is used.")
    backoff_acceptance: float = Field(
        0.25, ge=0.0, le=1.0, description="When a sequence's moving average of accepted / proposed guesses falls "
        "below this, it stops speculating for backoff_steps decode steps (plain decoding, CUDA graphs included), then "
        "tries again; 0 never backs off.",
    )
    backoff_steps: int = Field(8, ge=1, le=4096, description="Plain decode steps of a sequence's first back-off; each "
                               "back-off in a row doubles it, up to 8 times as many.")
    draft_model: str | None = Field(
        None, description="The draft model for method 'draft': a model directory or models:/NAME@ALIAS (a Llama-family "
        "model with the same tokenizer as the served one).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> SpeculativeConfig:
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"ngram_min ({self.ngram_min}) must not exceed ngram_max ({self.ngram_max})")
        if self.method == "draft" and not self.draft_model:
            raise ValueError("method 'draft' needs draft_model: a model directory or models:/NAME@ALIAS")
        if self.method != "draft" and self.draft_model:
            raise ValueError(f"draft_model is set but method is {self.method!r}: set method: draft, or drop draft_model")
        return self


_LORA_MODULES = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_ALL_LORA_MODULES: list[_LORA_MODULES] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraServingConfig(Section):
    """LoRA adapters loaded and unloaded while serving (paged engine): device slots, the CPU pool, what fits."""

    max_loras: int | None = Field(
        None, ge=1, le=256, description="Adapters resident on the device at once (the slots one batch may mix). "
        "Set, adapters may be loaded at run time (POST /v1/load_lora_adapter); unset, one slot per start-up "
        "adapter (serving.adapters) and no run-time loading.",
    )
    max_cpu_loras: int | None = Field(
        None, ge=1, le=4096, description="Adapters whose weights CPU memory holds (swapped from there into the "
        "least recently used idle slot when a request needs one); beyond it, the least recently used adapter "
        "that is off the device and unused is dropped and read again from its source when asked for; default "
        "max_loras.",
    )
    max_rank: int = Field(16, ge=1, le=1024, description="Largest LoRA rank a run-time load may bring (the slots' "
                          "width per module; compute grows with it).")
    target_modules: list[_LORA_MODULES] = Field(
        default_factory=lambda: list(_ALL_LORA_MODULES),
        min_length=1, description="Projections the slots adapt; a run-time adapter may target these only.",
    )
    adapter_roots: list[str] = Field(
        default_factory=list, description="Directories a run-time load may read adapters from (lora_path must "
        "resolve inside one, symlinks followed); empty: registry URIs (models:/NAME@ALIAS) only.",
    )

    @model_validator(mode="after")
    def _pool(self) -> LoraServingConfig:
        if self.max_cpu_loras is not None and (self.max_loras is None or self.max_cpu_loras < self.max_loras):
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) needs max_loras set and at most max_cpu_loras")
        return self


class ServingConfig(Section):
    """The serve and deploy stages' section: request defaults, served adapters, and one group per server part."""

    max_new_tokens: int = Field(64, gt=0, le=1 << 21, description="Default and cap for a request's max_tokens.")
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="Unmerged LoRA adapters served beside the base: served name -> directory (a peft LoRA adapter "
        "or an lmforge LoRA training run). A request whose `model` is the name is decoded with that adapter, "
        "batched with requests for the base and other adapters (paged engine).",
    )
    probe_prompt: str = Field("What does `json.dumps` do?", description="Request the deploy stage sends.")
    tool_parser: Literal["hermes"] = Field(
        "hermes", description="How chat tool calls are read from the model's output (and forced): 'hermes' is "
        "<tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>, the format of lmforge's chat templates "
        "and of many open models (lmforge.serving.api.tool_parsers).",
    )
    tensor_parallel: int = Field(
        1, ge=1, le=64, description="GPUs one engine spreads each layer over (paged engine, Llama models): every GPU "
        "holds 1/N of the heads, the MLP width and the KV cache, one worker process per GPU beside the server's. "
        "The GPUs are the server's device and the N - 1 after it; on a CPU, N processes.",
    )
    platform: Literal["local", "ray"] = Field(
        "local", description="Where `lmforge deploy` runs the server: 'local' one process on this machine; 'ray' a Ray "
        "Serve application (serving.ray: replicas, autoscaling, a rolling update when the served version changes).",
    )
    ray: RayServeConfig = Field(default_factory=RayServeConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    kv_cache: KVCacheConfig = Field(default_factory=KVCacheConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    speculative: SpeculativeConfig = Field(default_factory=SpeculativeConfig)
    lora: LoraServingConfig = Field(default_factory=LoraServingConfig)

    # The flat keys of files written before the groups, and where each lives now.
    moved_keys: ClassVar[Mapping[str, str]] = {
        **{key: f"server.{key}" for key in ("host", "port", "startup_timeout_s", "drain_timeout_s",
                                           "allow_unauthenticated_remote")},
        **{key: f"scheduler.{key}" for key in ("max_batch_size", "max_queue", "max_prefill_tokens", "max_model_len")},
        "kv_cache_mb": "kv_cache.memory_mb", "kv_block_size": "kv_cache.block_size", "kv_cache_dtype": "kv_cache.dtype",
        **{key: f"runtime.{key}" for key in ("engine", "device", "cpu_threads", "onnx_threads", "cuda_graphs",
                                            "quantization")},
    }

    @model_validator(mode="after")
    def _tensor_parallel_fits(self) -> ServingConfig:
        if self.tensor_parallel == 1:
            return self
        n = self.tensor_parallel
        if self.runtime.engine in ("hf", "onnx"):
            raise ValueError(f"tensor_parallel {n} needs the paged engine; runtime.engine is {self.runtime.engine!r}: "
                             "set it to 'auto' or 'paged', or tensor_parallel to 1")
        if self.adapters or self.lora.max_loras is not None:
            raise ValueError(f"tensor_parallel {n} does not split unmerged LoRA adapters yet (adapters, "
                             "lora.max_loras): serve each adapter merged as its own model, or set tensor_parallel to 1")
        if self.runtime.quantization != "none":
            raise ValueError(f"tensor_parallel {n} does not split quantized weights yet: set runtime.quantization "
                             "to 'none', or tensor_parallel to 1")
        if self.platform == "ray" and self.ray.num_gpus < n:
            raise ValueError(f"tensor_parallel {n} needs {n} GPUs per Ray Serve replica; ray.num_gpus is "
                             f"{self.ray.num_gpus:g}: set ray.num_gpus to {n}")
        return self

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, adapters: dict[str, str]) -> dict[str, str]:
        for name, path in adapters.items():
            if not name.strip() or name != name.strip() or not path:
                raise ValueError(f"adapter {name!r} -> {path!r}: names must be non-empty without surrounding "
                                 "spaces, and each needs a directory")
        return adapters
