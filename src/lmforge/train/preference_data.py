"""Rows of a preference phase: encoded (prompt, chosen, rejected) pairs and their reference log-probs.

:func:`preference_rows` is :func:`lmforge.train.data.phase_rows` for ``training.preference.loss``:
the preference set's train file (:func:`lmforge.data.sft.preference_file`), less the pairs the salted
split holds out for validation (:func:`lmforge.data.sft.split_finetune`, as SFT holds out records).
Each answer is rendered after its prompt with the tokenizer's chat template and masked as SFT is
(:func:`lmforge.model.chat.encode_chat`): labels on the answer's tokens only.

:func:`attach_reference` scores every pair once with the reference (DPO) before the first step,
on each rank its share, then all-reduced; a run that writes checkpoints keeps them beside its
checkpoints, so a resumed run uses exactly the same values (the weights have moved by then).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from lmforge.config.training import PhaseConfig
from lmforge.core.errors import ConfigError, DataError
from lmforge.core.workspace import Workspace
from lmforge.data.packing import IGNORE_INDEX
from lmforge.data.preferences import read_preferences
from lmforge.data.sft import preference_file, split_finetune
from lmforge.model.chat import encode_chat, end_of_turn
from lmforge.train.loop import autocast, to_device
from lmforge.train.objective import sequence_logps
from lmforge.train.preference import reference_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lmforge.model.types import CausalLM

Tensors = dict[str, torch.Tensor]
REFERENCE = "reference_logps"  # the rows' column of reference log-probabilities, (pairs, 2)
REFERENCE_FILE = "reference.safetensors"  # under the run's checkpoint root


def preference_rows(name: str, tokenizer: PreTrainedTokenizerBase, ws: Workspace, phase: PhaseConfig,
                    heldout_fraction: float) -> tuple[Tensors, Tensors | None, str]:
    """(training pairs, held-out pairs or None, where they came from), as :func:`phase_rows` gives."""
    path = preference_file(ws, "train")
    records, heldout = split_finetune(read_preferences(path), heldout_fraction)
    val_rows = encode_preferences(heldout, tokenizer, phase.seq_len) if heldout else None
    return encode_preferences(records, tokenizer, phase.seq_len), val_rows, f"preference pairs {path.name}"


def encode_preferences(records: list[dict], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> Tensors:
    """Right-padded rows of shape (pairs, 2, seq_len), chosen then rejected; labels on the answers only.

    A pair either of whose answers starts at or past ``seq_len`` is dropped (nothing of it would be
    scored); answers longer than that are cut at ``seq_len``, as SFT rows are.
    """
    end_turn = end_of_turn(tokenizer)
    pairs = []
    for number, record in enumerate(records, start=1):
        prompt, record_id = list(record["prompt"]), str(record.get("id") or f"#{number}")
        encoded = [encode_chat(tokenizer, prompt + list(record[side]), end_turn=end_turn, record_id=record_id,
                               learn_from=len(prompt)) for side in ("chosen", "rejected")]
        if any(all(label == IGNORE_INDEX for label in labels[:seq_len]) for _, labels in encoded):
            continue
        pairs.append([(ids[:seq_len], labels[:seq_len]) for ids, labels in encoded])
    if records and not pairs:
        raise DataError(f"all {len(records)} preference pairs have prompts longer than seq_len={seq_len}",
                        "raise training.finetune.seq_len (and model.max_seq_len)")
    input_ids = torch.full((len(pairs), 2, seq_len), tokenizer.pad_token_id, dtype=torch.long)
    labels_out = torch.full((len(pairs), 2, seq_len), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(pairs), 2, seq_len), dtype=torch.long)
    for i, pair in enumerate(pairs):
        for side, (ids, labels) in enumerate(pair):
            input_ids[i, side, : len(ids)] = torch.tensor(ids)
            labels_out[i, side, : len(labels)] = torch.tensor(labels)
            mask[i, side, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels_out, "attention_mask": mask}


def attach_reference(model: CausalLM, rows: dict[str, Tensors], batch_size: int, device: torch.device,
                     cache: Path | None = None, resumed: bool = False) -> dict[str, Tensors]:
    """``rows`` (by split) with :data:`REFERENCE`: each pair's summed answer log-probabilities under
    the reference (:func:`lmforge.train.preference.reference_model`), float32, shape (pairs, 2).

    Call it before the first step. ``cache`` (given when checkpoints are written; rank 0 writes it)
    keeps them; ``resumed`` reads them back from it on every rank, where the weights have moved.
    """
    from safetensors.torch import load_file, save_file

    if resumed:
        if cache is None or not cache.exists():
            raise ConfigError(f"the checkpoint to resume has no reference log-probabilities beside it ({cache})",
                              "start the run anew (DPO's reference is the model before the phase's first step)")
        saved = load_file(cache)
        for split, data in rows.items():
            if split not in saved or len(saved[split]) != len(data["input_ids"]):
                raise ConfigError(f"the preference set changed since the checkpoint was written ({cache} holds "
                                  "another number of pairs)", "resume with the preference set of that run, or start anew")
        return {split: {**data, REFERENCE: saved[split]} for split, data in rows.items()}
    scored = {split: {**data, REFERENCE: reference_logps(model, data, batch_size, device)} for split, data in rows.items()}
    if cache is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp")
        save_file({split: data[REFERENCE].contiguous() for split, data in scored.items()}, str(tmp))
        tmp.replace(cache)
    return scored


@torch.no_grad()
def reference_logps(model: CausalLM, rows: Tensors, batch_size: int, device: torch.device) -> torch.Tensor:
    """Summed answer log-probabilities of every pair under the reference, (pairs, 2); each rank scores
    its share and one all-reduce gives every rank all of them."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    pairs = len(rows["input_ids"])
    out = torch.zeros(pairs, 2, dtype=torch.float32, device=device)
    was_training = model.training
    model.eval()  # no dropout: the reference is one fixed function
    with reference_model(model) as reference:
        for index in [i for i in torch.arange(pairs)[rank::world].split(batch_size) if len(i)]:
            batch = {key: to_device(rows[key][index].flatten(0, 1), device) for key in ("input_ids", "labels")}
            with autocast(device):
                logps, _ = sequence_logps(reference, batch["input_ids"], batch["labels"])
            out[index.to(device)] = logps.view(-1, 2).float()
    model.train(was_training)
    if world > 1:
        dist.all_reduce(out)
    return out.cpu()
