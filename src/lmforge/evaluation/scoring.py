"""Scoring a trained model: mean next-token loss over held-out blocks, greedy answers to held-out chats.

Used by the evaluate stage (:mod:`lmforge.stages.evaluate`); the blocks come from
:func:`lmforge.data.packing.pack_documents`, the prompts from the tokenizer's chat template
(:func:`lmforge.model.chat.render_chat`), so the model is measured on the format it was trained on.
A held-out record is answered at its last assistant turn, with every turn before it (system prompt,
earlier turns, tool results) as the prompt: an instruction/response pair is the one-turn case.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F

from lmforge.core.errors import DataError
from lmforge.model.chat import Message, conversation, render_chat, stop_token_ids
from lmforge.train.artifacts import load_trained

if TYPE_CHECKING:
    from transformers import GenerationMixin, PreTrainedConfig, PreTrainedTokenizerBase

    from lmforge.model.types import CausalLM


def load_model(model_dir: Path) -> tuple[CausalLM, PreTrainedTokenizerBase]:
    """Model and tokenizer from a local directory: safetensors only, never remote code."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    # Prompt-learning and bottleneck adapters cannot be merged: load_trained applies them, so the
    # tuned model is measured, not its base.
    model = load_trained(model_dir, dtype=torch.float32)
    if tokenizer.pad_token_id is None:
        # Padded positions are masked out, so any id works; EOS keeps the vocabulary unchanged.
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def context_window(config: PreTrainedConfig, default: int) -> int:
    """The model's longest sequence (``max_position_embeddings`` or ``n_positions``), else ``default``."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def heldout_loss(model: CausalLM, blocks: torch.Tensor | Sequence[Sequence[int]], batch_size: int) -> tuple[float, int]:
    """Mean next-token cross-entropy (nats) over every predicted token of ``blocks``, and that token count."""
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = torch.as_tensor(blocks[start : start + batch_size], dtype=torch.long)
        logits = model(input_ids=ids).logits
        targets = ids[:, 1:]
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += targets.numel()
    return total / count, count


def answer_prompt(tokenizer: PreTrainedTokenizerBase, record: Mapping[str, Any]) -> tuple[str, str, str]:
    """(prompt, reference, question) of one held-out SFT record (a chat or an instruction/response pair).

    The prompt is the conversation before its last assistant turn, rendered with the header of the
    assistant's answer; the reference is that turn's text (its tool calls as JSON when it has no
    text); the question is the last user turn, for the report.
    """
    messages, tools = conversation(record)
    answers = [i for i, message in enumerate(messages) if message.get("role") == "assistant"]
    if not answers:  # the validate stage's record suite stops such a set before training
        raise DataError(f"held-out record {record.get('id')!r} has no assistant turn to score",
                        "fix the SFT test set (every record needs an answer), then rerun `lmforge collect`")
    last = answers[-1]
    users = [m for m in messages[:last] if m.get("role") == "user"]
    question = str(users[-1].get("content") or "") if users else ""
    prompt = render_chat(tokenizer, messages[:last], tools, add_generation_prompt=True)
    return prompt, _answer_text(messages[last]), question


def _answer_text(message: Message) -> str:
    content = str(message.get("content") or "").strip()
    if content or not message.get("tool_calls"):
        return content
    calls = [call.get("function", call) for call in message["tool_calls"]]
    return json.dumps([{"name": call.get("name"), "arguments": call.get("arguments")} for call in calls])


def generate_answers(
    model: CausalLM, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int, batch_size: int,
    context: int,
) -> list[str]:
    """Greedy answers to rendered ``prompts`` (:func:`answer_prompt`), cut at the first EOS or end of turn."""
    from transformers import GenerationConfig

    max_new_tokens = max(1, min(max_new_tokens, context - 1))
    # Left padding and left truncation keep every prompt's end (the "### Response:" cue) adjacent
    # to the generated tokens.
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    # The template's end-of-turn token (<|im_end|>, <|eot_id|>) ends an answer as EOS does.
    eos, pad = stop_token_ids(tokenizer), tokenizer.pad_token_id
    # A fresh config so sampling settings saved with the model never leak into the evaluation.
    generation = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad
    )
    # The causal LMs transformers loads generate (GenerationMixin); peft's wrapper forwards generate.
    generator = cast("GenerationMixin", model)
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        # The template writes any BOS itself (training and the chat endpoint add none either).
        encoded = tokenizer(
            prompts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True,
            max_length=context - max_new_tokens, add_special_tokens=False,
        )
        # Without return_dict_in_generate, generate returns the token ids.
        output = cast(torch.Tensor, generator.generate(**encoded, generation_config=generation))
        for row in output[:, encoded["input_ids"].shape[1] :].tolist():
            stops = [i for i, token in enumerate(row) if token in eos]
            if stops:
                row = row[: stops[0]]
            # One list of ids decodes to one str (transformers' decode is typed for batches too).
            answers.append(cast(str, tokenizer.decode(row, skip_special_tokens=True)).strip())
    return answers
