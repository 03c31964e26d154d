"""The serving section of the pipeline config: how ``lmforge serve`` and the deploy stage run.

Re-exported by ``lmforge.config.stages`` (the pipeline composes it as ``serving``). Every field is
also valid in the ``--serving-config`` file of ``python -m lmforge.serving``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ServingConfig(BaseModel):
    # Same rules as every stage config (stages.StageConfig), restated to avoid an import cycle.
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="Bind address; loopback by default.")
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port.")
    max_new_tokens: int = Field(64, gt=0, description="Default and cap for a request's max_tokens.")
    max_batch_size: int = Field(8, gt=0, description="Most requests decoded together (the running batch).")
    startup_timeout_s: float = Field(120, gt=0)
    probe_prompt: str = Field("What does `json.dumps` do?", description="Request the deploy stage sends.")
    max_queue: int = Field(
        64, ge=0, description="Requests that may wait for a batch slot; beyond it the server answers 429."
    )
    engine: Literal["auto", "paged", "hf", "onnx"] = Field(
        "auto",
        description="'paged': our decode loop over a paged KV cache (Llama-family models); 'hf': the "
        "model's own forward with a dense cache (any causal LM); 'onnx': ONNX Runtime on CPU over a directory "
        "written by `lmforge export-onnx`; 'auto': onnx for such a directory, else paged when the model supports it.",
    )
    onnx_threads: int | None = Field(None, ge=1, description="ONNX Runtime intra-op threads; default one per core.")
    cpu_threads: int | None = Field(
        None, ge=1, description="torch threads of the engine on a CPU; default one for small models (hidden size "
        "under 1024, where waking threads costs more than they save) and one per core otherwise.",
    )
    device: str | None = Field(None, description="'cuda', 'cuda:1' or 'cpu'; default CUDA when present.")
    kv_cache_mb: float | None = Field(
        None,
        gt=0,
        description="KV cache memory budget in MiB (paged engine). Default: on CUDA half the device memory "
        "free after loading the weights; on CPU room for max_batch_size full-length sequences, at most 1024.",
    )
    kv_block_size: int = Field(16, ge=1, le=256, description="Tokens per KV cache block.")
    max_prefill_tokens: int = Field(
        2048, ge=16, description="Prompt tokens prefilled per engine step (chunked prefill keeps streams moving)."
    )
    max_model_len: int | None = Field(
        None, gt=0, description="Cap on prompt + completion tokens; default the model's context window."
    )
    cuda_graphs: bool = Field(True, description="Capture the decode step as CUDA graphs (paged engine on CUDA).")
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="Unmerged LoRA adapters served beside the base: served name -> directory (a peft LoRA adapter "
        "or an lmforge LoRA training run). A request whose `model` is the name is decoded with that adapter, "
        "batched with requests for the base and other adapters (paged engine).",
    )
    quantization: Literal["none", "int8", "int4", "fp8"] = Field(
        "none",
        description="Weights of the decoder's linear layers at load (lmforge.serving.quantize): 'int8' weight-only "
        "per output channel (CPU and CUDA); 'int4' weight-only, groups of 128 (CUDA); 'fp8' e4m3 weights and "
        "per-row dynamic fp8 activations (CUDA, compute capability >= 8.9). bench/RESULTS.md lists each one's "
        "speed and perplexity change.",
    )
    kv_cache_dtype: Literal["auto", "bf16", "fp8"] = Field(
        "auto",
        description="KV cache storage (paged engine): 'auto' the model's dtype; 'fp8' float8 e4m3 (half the bytes "
        "of bf16, so twice the tokens in the same kv_cache_mb; CPU, or CUDA with compute capability >= 8.9).",
    )
    allow_unauthenticated_remote: bool = Field(
        False,
        description="Allow binding beyond loopback without an API key (LMFORGE_API_KEY). Off: such a bind is refused.",
    )
    drain_timeout_s: float = Field(30, ge=0, description="On shutdown, how long running requests may finish.")

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, adapters: dict[str, str]) -> dict[str, str]:
        for name, path in adapters.items():
            if not name.strip() or name != name.strip() or not path:
                raise ValueError(f"adapter {name!r} -> {path!r}: names must be non-empty without surrounding "
                                 "spaces, and each needs a directory")
        return adapters
