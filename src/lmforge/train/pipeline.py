"""Pipeline parallelism for the one training loop: the model's blocks cut into stages, one per worker of a pipeline.

``training.parallel.pipeline_parallel: P`` (:mod:`lmforge.config.parallel`) makes :func:`lmforge.train.loop.train_phase`
call :func:`split`: the workers form a mesh ``data_parallel x pipeline_parallel`` (ranks ``d*P .. d*P+P-1`` are one
pipeline, fed one batch stream: :func:`data_rank`), and each keeps only its stages of the llama-type model (the
embeddings on the first, the final norm, output layer and loss on the last; the other blocks are dropped, so a
worker holds ``1/P`` of the blocks' weights, gradients and optimizer state). Each step's micro-batches run through
``torch.distributed.pipelining``'s schedule (1F1B, interleaved 1F1B with two stages per worker, or GPipe), which
sends activations forward and their gradients back between neighbouring stages. Replicas of one stage then sum
their gradients (explicit all-reduces over the data-parallel dimension); tied input and output embeddings, which
live on the first and the last stage, sum theirs too, so both copies take the same steps.

The loss of a step is computed on the last stage and broadcast to the pipeline's other workers, so every rank
reports it (logging, metrics, early stopping see one number); the loop's all-reduced target count counts each
batch P times, as its loss sum then does. The pruned model keeps the full model's parameter names (dropped
blocks become ``nn.Identity``), so checkpoints are full tensors under those names and the full model's optimizer
indices, gathered over the pipeline (:class:`Pipeline` is also the loop's state I/O): a checkpoint resumes with any
strategy and number of workers, and :func:`full_model_state` gives the worker a plain transformers model to save.
Validation runs the stages forward-only with plain point-to-point sends (one batch, no schedule needed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from lmforge.core.errors import ConfigError
from lmforge.data.packing import IGNORE_INDEX
from lmforge.train import checkpoint as ckpt
from lmforge.train.accel.speed import transformer_blocks
from lmforge.train.objective import CausalLMObjective, FusedLinearCrossEntropy, LogitsCrossEntropy

if TYPE_CHECKING:
    from lmforge.config.training import PhaseConfig, TrainingConfig
    from lmforge.model.types import CausalLM
    from lmforge.train.preference import PreferenceObjective

DP, PP = "data_parallel", "pipeline_parallel"
Tensors = dict[str, torch.Tensor]


def degree(training: TrainingConfig) -> int:
    """The pipeline's number of workers this run uses (1: none, or no process group)."""
    initialized = dist.is_available() and dist.is_initialized()
    return training.parallel.pipeline_parallel if initialized else 1


def data_rank(training: TrainingConfig) -> tuple[int, int]:
    """(rank, size) of this worker along the data-parallel dimension: one pipeline's workers share a batch stream."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    pp = degree(training)
    return dist.get_rank() // pp, dist.get_world_size() // pp


def check_group(training: TrainingConfig) -> None:
    """ConfigError unless the process group that exists splits into pipelines (a cluster may start another count)."""
    pp = degree(training)
    if pp > 1 and dist.get_world_size() % pp:
        raise ConfigError(f"parallel.pipeline_parallel: {pp} does not divide the {dist.get_world_size()} workers into "
                          "pipelines", f"set placement.num_workers to a multiple of {pp}")


def check_model(training: TrainingConfig, model: CausalLM) -> None:
    """ConfigError unless the stages can cut ``model`` (its type and layers: a base_model's are known only now)."""
    config = model.config
    heads = config.num_attention_heads
    problem = training.parallel.model_problem(config.model_type, heads, getattr(config, "num_key_value_heads", heads),
                                              len(transformer_blocks(model)))
    if problem is not None:
        raise ConfigError(*problem)


def stage_layers(layers: int, stages: int) -> list[range]:
    """The blocks of each stage: as even as can be, the earlier stages one more (the last also runs the loss)."""
    size, extra = divmod(layers, stages)
    starts = [s * size + min(s, extra) for s in range(stages + 1)]
    return [range(starts[s], starts[s + 1]) for s in range(stages)]


class Stage(torch.nn.Module):
    """One stage of a llama-type model: [embeddings] -> its blocks -> [final norm]; the output layer is the loss's."""

    def __init__(self, model: CausalLM, layers: range, first: bool, last: bool) -> None:
        super().__init__()
        decoder = model.get_decoder()  # type: ignore[operator]  # a transformers PreTrainedModel's accessor
        self.config = model.config
        self.embed = decoder.embed_tokens if first else None
        self.blocks = torch.nn.ModuleList([decoder.layers[i] for i in layers])
        self.norm = decoder.norm if last else None
        self.rotary = decoder.rotary_emb  # buffers only: every stage computes the positions' rotations itself

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        hidden = self.embed(x) if self.embed is not None else x
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=None, cache=None,
                                  position_ids=positions)
        rope = self.rotary(hidden, position_ids=positions)
        for block in self.blocks:
            hidden = block(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rope, use_cache=False)
        return self.norm(hidden) if self.norm is not None else hidden


def split(objective: CausalLMObjective | PreferenceObjective, model: CausalLM, training: TrainingConfig,
          phase: PhaseConfig, device: torch.device) -> tuple[CausalLMObjective | PreferenceObjective, Pipeline | None]:
    """(the loop's objective, the pipeline): with ``pipeline_parallel > 1`` in a process group, ``model`` cut in
    place to this worker's stages and the :class:`Pipeline` that runs them, twice; else ``(objective, None)``."""
    if degree(training) == 1:
        return objective, None
    if type(objective) is not CausalLMObjective:
        raise ConfigError("parallel.pipeline_parallel computes the next-token loss on its last stage, and this phase "
                          "trains with a preference loss", "set training.preference.loss: null, or pipeline_parallel: 1")
    check_group(training)
    check_model(training, model)
    pipe = Pipeline(objective, model, training, phase, device)
    return pipe, pipe


def adamw_names(model: torch.nn.Module) -> list[str]:
    """Trainable parameter names in the order :func:`lmforge.train.loop.adamw` counts them (matrices, then the rest):
    the optimizer state's indices."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, p in named if p.dim() >= 2] + [n for n, p in named if p.dim() < 2]


class Pipeline(CausalLMObjective):
    """This worker's stages and their schedule; its forward is a validation pass (the summed loss, on every rank)."""

    def __init__(self, objective: CausalLMObjective, model: CausalLM, training: TrainingConfig, phase: PhaseConfig,
                 device: torch.device) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        super().__init__(model, objective.label_smoothing, objective.fused, kernel=objective.kernel)
        self.fused, self.chunk_fn, self.device, self.seq_len = objective.fused, objective.chunk_fn, device, phase.seq_len
        p, world, rank = degree(training), dist.get_world_size(), dist.get_rank()
        mesh = init_device_mesh(device.type, (world // p, p), mesh_dim_names=(DP, PP))
        self.pp_group, self.dp_group = mesh[PP].get_group(), mesh[DP].get_group()
        self.p, self.first_rank = p, rank - rank % p
        self.width = int(model.config.hidden_size)  # the activations a stage sends: rows x length x width
        self.count = training.parallel.pipeline_stages()
        self.mine = [s for s in range(self.count) if s % p == rank % p]  # looped: stage s on pipeline rank s % p
        # The full model's names and optimizer order, before the blocks of other stages are dropped.
        full_name = {id(param): name for name, param in model.named_parameters()}
        self.full_order = adamw_names(model)
        self.full_matrices = sum(1 for _, param in model.named_parameters() if param.requires_grad and param.dim() >= 2)
        tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight  # type: ignore[operator]  # as get_decoder
        self._prune(model)
        self.global_name = {name: full_name[id(param)] for name, param in model.named_parameters()}
        self.local_order = adamw_names(model)
        # The last stage's output layer is the first stage's embedding under another name: counted once in the norm.
        self.duplicates = {name for name, full in self.global_name.items() if name != full}
        self.tied_group = self._tied_group(world, p) if tied else None
        self.tied_name = "lm_head.weight" if self.count - 1 in self.mine else "model.embed_tokens.weight"
        self.scale: float = 1.0  # of this step's summed losses: the pipeline's share of 1 / target tokens
        self.schedule = self._schedule(training, device)

    def _prune(self, model: CausalLM) -> None:
        """Keep this worker's stages only; dropped blocks become Identity so every name keeps its index."""
        layers = stage_layers(len(transformer_blocks(model)), self.count)
        keep = {i for s in self.mine for i in layers[s]}
        first, last = 0 in self.mine, self.count - 1 in self.mine
        self.stages = torch.nn.ModuleList([Stage(model, layers[s], s == 0, s == self.count - 1) for s in self.mine])
        decoder = model.get_decoder()  # type: ignore[operator]  # a transformers PreTrainedModel's accessor
        for i in range(len(decoder.layers)):
            if i not in keep:
                decoder.layers[i] = torch.nn.Identity()
        if not first:
            decoder.embed_tokens = None
        if not last:
            decoder.norm = None
            model.lm_head = None
        self.head = model.get_output_embeddings() if last else None  # type: ignore[operator]  # as above

    def _tied_group(self, world: int, p: int) -> dist.ProcessGroup | None:
        """The group of each pipeline's first and last worker (tied embeddings); every rank creates them all."""
        mine, rank = None, dist.get_rank()
        for start in range(0, world, p):
            group = dist.new_group([start, start + p - 1])
            mine = group if rank in (start, start + p - 1) else mine
        return mine

    def _schedule(self, training: TrainingConfig, device: torch.device) -> Any:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

        stages: list[Any] = [PipelineStage(module, s, self.count, device, group=self.pp_group)
                  for s, module in zip(self.mine, self.stages)]
        n = training.parallel.microbatches()
        # Summed losses, each scaled by the step's target count here (scale_grads would divide by n again).
        kind = training.parallel.pipeline_schedule
        if kind == "interleaved_1f1b":
            return ScheduleInterleaved1F1B(stages, n, loss_fn=self._loss, scale_grads=False)
        return (Schedule1F1B if kind == "1f1b" else ScheduleGPipe)(stages[0], n, loss_fn=self._loss, scale_grads=False)

    def _summed(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The summed next-token loss of the last stage's hidden states, as :class:`CausalLMObjective` computes it."""
        assert self.head is not None  # only the last stage computes a loss
        if torch.is_autocast_enabled(hidden.device.type):
            hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
        if self.fused:
            with_grad = torch.is_grad_enabled() and (hidden.requires_grad or self.head.weight.requires_grad)
            return FusedLinearCrossEntropy.apply(hidden.flatten(0, 1), self.head.weight, targets.flatten(),
                                                 self.label_smoothing, self.chunk_fn, with_grad)
        return LogitsCrossEntropy.apply(self.head(hidden).flatten(0, 1), targets.flatten(), self.label_smoothing)

    def _loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._summed(hidden, targets) * self.scale

    def _inputs(self, batches: list[Tensors]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids, shifted targets) of ``batches`` on the device, padded to the phase's length: every
        micro-batch a stage sends has one shape. Right padding changes no loss (its targets are ignored)."""
        ids, targets = [], []
        length = max([self.seq_len, *(b["input_ids"].shape[1] for b in batches)])
        for b in batches:
            mask = b.get("attention_mask")
            if mask is not None and bool((mask[..., 1:] > mask[..., :-1]).any()):
                raise ConfigError("parallel.pipeline_parallel's stages attend causally over whole rows, and a batch "
                                  "is left-padded", "pack the rows or pad them on the right, or pipeline_parallel: 1")
            pad = length - b["input_ids"].shape[1]
            ids.append(torch.nn.functional.pad(b["input_ids"], (0, pad)))
            shifted = torch.nn.functional.pad(b["labels"][:, 1:], (0, 1 + pad), value=IGNORE_INDEX)
            targets.append(shifted)
        return torch.cat(ids).to(self.device), torch.cat(targets).to(self.device)

    def step(self, micro: list[Tensors], units: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one optimizer step's micro-batches through the schedule; gradients summed over
        the replicas (and tied copies). ``units``: the loop's all-reduced target count (each batch counted P times).
        Returns the summed loss of this pipeline's batch, on every one of its workers."""
        ids, targets = self._inputs(micro)
        self.scale = self.p / float(units)
        args, last = (ids,) if 0 in self.mine else (), self.count - 1 in self.mine
        # The schedule's first step also calls the loss once to learn its shapes: only these n losses count.
        losses: list[torch.Tensor] = []
        self.schedule.step(*args, target=targets if last else None, losses=losses if last else None)
        for param in self.model.parameters():
            if param.grad is not None and dist.get_world_size(self.dp_group) > 1:
                dist.all_reduce(param.grad, group=self.dp_group)
        if self.tied_group is not None:
            grad = self.model.get_parameter(self.tied_name).grad
            dist.all_reduce(grad, group=self.tied_group)  # type: ignore[arg-type]  # both copies had gradients
        summed = torch.stack(losses).sum() / self.scale if losses else torch.zeros((), device=self.device)
        return self._broadcast(summed)

    def _broadcast(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` of the last stage's worker, on every worker of the pipeline."""
        value = value.detach().float().reshape(())
        dist.broadcast(value, src=self.first_rank + (self.count - 1) % self.p, group=self.pp_group)
        return value

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,  # type: ignore[override]  # validation only
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The summed loss of one batch, forward-only through the stages (point-to-point sends), on every worker."""
        ids, targets = self._inputs([{"input_ids": input_ids, "labels": labels}])
        hidden = ids
        for s in self.mine:
            if s > 0:
                hidden = torch.empty((*ids.shape, self.width), device=self.device)
                dist.recv(hidden, src=self.first_rank + (s - 1) % self.p)
            hidden = self.stages[self.mine.index(s)](hidden)
            if s < self.count - 1:
                dist.send(hidden.float().contiguous(), dst=self.first_rank + (s + 1) % self.p)
        last = self.count - 1 in self.mine
        return self._broadcast(self._summed(hidden, targets) if last else torch.zeros((), device=self.device))

    # ------------------------------------------------ the norm and the loop's state I/O over the stages

    def clip_grad_norm_(self, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip by the norm of all stages' gradients (the tied output layer counted once); return that norm."""
        counted = [p.grad for n, p in self.model.named_parameters() if p.grad is not None and n not in self.duplicates]
        square = torch.nn.utils.get_total_norm(counted).to(self.device) ** 2 if counted else torch.zeros((), device=self.device)
        dist.all_reduce(square, group=self.pp_group)
        total = square.sqrt()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    def _gather(self, local: dict[str, Any], keep: bool) -> dict[str, Any]:
        """The union of the pipeline's ``local`` dicts (host copies), kept where ``keep``; collective."""
        parts: list[Any] = [None] * self.p
        host = {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v for k, v in local.items()}
        dist.all_gather_object(parts, host, group=self.pp_group)
        return {k: v for part in parts for k, v in part.items()} if keep else {}

    def full_state(self, tensors: Tensors, keep: bool = True) -> Tensors:
        """Full tensors under the full model's names, from all stages (the tied output layer once)."""
        return self._gather({self.global_name[n]: t for n, t in tensors.items() if n not in self.duplicates}, keep)

    def load_trainable(self, model: torch.nn.Module, state: Tensors) -> None:
        ckpt.load_trainable(model, {n: state[self.global_name[n]] for n in ckpt.trainable_state(model)
                                    if self.global_name[n] in state})

    def optimizer_state(self, optimizer: torch.optim.Optimizer, keep: bool) -> tuple[Tensors, dict]:
        """(tensors, JSON) of the optimizer as the full model's would be: indices and groups in its order."""
        tensors, meta = ckpt.optimizer_state(optimizer)
        full = {name: i for i, name in enumerate(self.full_order)}
        index = {str(i): str(full[self.global_name[name]]) for i, name in enumerate(self.local_order)
                 if name not in self.duplicates}

        def renamed(flat: dict) -> dict:
            return {f"{index[k.split('.', 1)[0]]}.{k.split('.', 1)[1]}": v for k, v in flat.items()
                    if k.split(".", 1)[0] in index}

        matrices = self.full_matrices
        lists = [list(range(matrices)), list(range(matrices, len(self.full_order)))]
        groups = [{**g, "params": lists[i]} for i, g in enumerate(meta["param_groups"])]
        scalars = self._gather(renamed(meta["scalars"]), True)
        return self._gather(renamed(tensors), keep), {**meta, "scalars": scalars, "param_groups": groups}

    def load_optimizer(self, optimizer: torch.optim.Optimizer, tensors: Tensors, meta: dict) -> None:
        full = {name: i for i, name in enumerate(self.full_order)}
        index = {str(full[self.global_name[name]]): str(i) for i, name in enumerate(self.local_order)}

        def renamed(flat: dict) -> dict:
            return {f"{index[k.split('.', 1)[0]]}.{k.split('.', 1)[1]}": v for k, v in flat.items()
                    if k.split(".", 1)[0] in index}

        counts = [len(g["params"]) for g in optimizer.param_groups]
        lists = [list(range(counts[0])), list(range(counts[0], sum(counts)))][:len(counts)]
        groups = [{**g, "params": lists[i]} for i, g in enumerate(meta["param_groups"])]
        ckpt.load_optimizer(optimizer, renamed(tensors), {**meta, "scalars": renamed(meta["scalars"]),
                                                          "param_groups": groups})

    def capture(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                shards: bool = False) -> tuple[dict[str, Tensors], dict[str, Any]]:
        """:func:`lmforge.train.checkpoint.capture` over the stages: always full tensors (kept by rank 0), under
        the full model's names and optimizer indices, so any strategy and number of workers resumes them."""
        keep = dist.get_rank() == 0
        rng_tensors, rng_meta = ckpt.rng_state()
        opt_tensors, opt_meta = self.optimizer_state(optimizer, keep)
        groups = {"model": self.full_state(ckpt.trainable_state(model), keep), "optimizer": opt_tensors,
                  "rng": rng_tensors}
        return groups, {"optimizer": opt_meta, "rng": rng_meta}

    def restore(self, saved: ckpt.Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """:func:`lmforge.train.checkpoint.restore` into this worker's stages (a full checkpoint, any strategy's)."""
        loop = saved.state["loop"]
        if saved.state.get("format", "full") != "full":
            raise ConfigError(f"the checkpoint {saved.path} holds sharded tensors (an fsdp run's), and "
                              "parallel.pipeline_parallel resumes full ones only", "resume it with parallel.strategy: "
                              "fsdp or ddp (any number of workers), or start the pipeline run anew")
        self.load_trainable(model, saved.tensors["model"])
        self.load_optimizer(optimizer, saved.tensors["optimizer"], loop["optimizer"])
        ckpt.set_rng_state(saved.tensors["rng"], loop["rng"])


def full_model_state(model: torch.nn.Module, training: TrainingConfig) -> Tensors:
    """The whole state_dict of a model :func:`split` cut, on every worker (collective over the process group): the
    first pipeline's stages contribute theirs (the others' replicas hold the same values)."""
    local = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    parts: list[Any] = [None] * dist.get_world_size()
    first_pipeline = dist.get_rank() < degree(training)
    dist.all_gather_object(parts, local if first_pipeline else {})
    return {k: v for part in parts for k, v in part.items()}
