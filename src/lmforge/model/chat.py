"""Conversations as text and tokens: rendering through the tokenizer's chat template, and the loss mask.

The one home of how a conversation becomes a prompt or a training row. Fine-tuning
(:func:`lmforge.train.data.encode_sft`, which the tokenize stage and training on the fly both call),
evaluation and the chat endpoint all render through :func:`render_chat`, with the template the
tokenizer carries (a named one of :mod:`lmforge.model.prompt`, or a pretrained base's own), so the
model is trained, evaluated and served on one format.

Masking (:func:`encode_chat`) renders the conversation incrementally: the prompt before each
assistant turn, then the conversation through that turn. The text between them is the turn
(content, tool calls, end-of-turn token) and is learned; everything else (system, user and tool
turns, the headers the template writes) is IGNORE_INDEX. That needs a template that renders the
beginning of a conversation as the beginning of the whole, which every named template does; a base
template that does not (one that rewrites earlier turns) is refused with a ConfigError.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from lmforge.core.errors import ConfigError, DataError
from lmforge.data.packing import IGNORE_INDEX
from lmforge.model.prompt import TEMPLATES

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Message = Mapping[str, Any]

# A reply no template rewrites, to find where the template ends an assistant turn.
_PROBE_REPLY = "lmforgeprobereply"


def conversation(record: Mapping[str, Any]) -> tuple[list[Message], list[dict] | None]:
    """(messages, tools) of an SFT record: an OpenAI-style chat (``messages``, optional ``tools``), or a
    legacy ``{"instruction", "response"}`` pair as one user turn and one assistant turn."""
    if record.get("messages"):
        return list(record["messages"]), record.get("tools") or None
    return ([{"role": "user", "content": record["instruction"].strip()},
             {"role": "assistant", "content": record["response"].strip()}], None)


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], tools: list[dict] | None = None, *,
                add_generation_prompt: bool = False) -> str:
    """``messages`` (and ``tools``) rendered by the tokenizer's chat template; with
    ``add_generation_prompt``, followed by the header of the assistant's answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template",
                        "rerun `lmforge tokenize CONFIG` (it saves model.chat_template with the tokenizer)")
    tool_list: list[dict | Callable[..., Any]] | None = list(tools) if tools else None
    # Untokenized, the template renders one str (transformers types every form it can return).
    return cast(str, tokenizer.apply_chat_template(
        cast("list[dict[str, str]]", list(messages)), tools=tool_list, tokenize=False,
        add_generation_prompt=add_generation_prompt))


def render_prompt(tokenizer: PreTrainedTokenizerBase, instruction: str) -> str:
    """The prompt for one user instruction, ending where the model's answer begins (evaluation)."""
    return render_chat(tokenizer, [{"role": "user", "content": instruction.strip()}], add_generation_prompt=True)


def end_of_turn(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The special token the template closes an assistant turn with (EOS, ``<|im_end|>``,
    ``<|eot_id|>`` ...), found by rendering a probe exchange; None if the template writes none."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_REPLY}]
    text = render_chat(tokenizer, probe)
    if _PROBE_REPLY not in text:
        return None
    after = text[text.index(_PROBE_REPLY) + len(_PROBE_REPLY):].lstrip()
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    if ids and is_special(tokenizer, ids[0]):
        return cast(str, tokenizer.convert_ids_to_tokens(ids[0]))
    return None


def is_special(tokenizer: PreTrainedTokenizerBase, token_id: int) -> bool:
    """Whether ``token_id`` is a special token (the named ones, or an added token marked special)."""
    added = tokenizer.added_tokens_decoder.get(token_id)
    return token_id in tokenizer.all_special_ids or bool(added is not None and added.special)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end generation: EOS, and the template's end-of-turn token when it is another one.

    Training saves them as the generation config's EOS ids, which serving stops on; evaluation cuts
    answers at them. A template that cannot render a probe exchange leaves EOS alone (the chat
    endpoint then reports the template's own error per request).
    """
    from jinja2 import TemplateError

    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if getattr(tokenizer, "chat_template", None):
        try:
            token = end_of_turn(tokenizer)
        except TemplateError:
            token = None
        if token is not None:
            ids.append(cast(int, tokenizer.convert_tokens_to_ids(token)))
    return list(dict.fromkeys(ids))


def template_label(tokenizer: PreTrainedTokenizerBase) -> str:
    """The name of the tokenizer's template (``lmforge``, ``chatml``, ``llama3``), else ``custom:<sha256
    prefix>`` (a pretrained base's own), or ``none``: recorded with the run so the format is on record."""
    source = getattr(tokenizer, "chat_template", None)
    if not source:
        return "none"
    for name, template in TEMPLATES.items():
        if source == template.source:
            return name
    return "custom:" + hashlib.sha256(str(source).encode()).hexdigest()[:12]


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], tools: list[dict] | None = None,
                *, end_turn: str | None = None, record_id: str = "?", learn_from: int = 0) -> tuple[list[int], list[int]]:
    """(token ids, labels) of a conversation: labels are the ids on every assistant turn (content,
    tool calls, end-of-turn token), IGNORE_INDEX elsewhere. Text after the last turn is dropped.
    Assistant turns before message ``learn_from`` are context, not learned (a preference pair's
    prompt may hold earlier answers; only the chosen or rejected answer is scored).

    Each piece is tokenized apart, as serving tokenizes a prompt and then generates, so training
    and inference see the same token boundary. ``end_turn`` is :func:`end_of_turn` (computed once
    by the caller for a whole set of records).
    """
    from jinja2 import TemplateError

    if not messages or messages[-1].get("role") != "assistant":
        raise DataError(f"SFT record {record_id}: a chat record must end with an assistant message",
                        "fix the SFT file: the assistant turns are what the model learns to answer")
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # the text tokenized so far: every earlier render must start with it
    try:
        for index, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            prompt = render_chat(tokenizer, messages[:index], tools, add_generation_prompt=True)
            full = render_chat(tokenizer, messages[: index + 1], tools)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise _not_incremental(tokenizer, record_id, index)
            turn = full[len(prompt):]
            # What the template writes after the end-of-turn token (a newline) belongs to the next prompt.
            cut = turn.rfind(end_turn) + len(end_turn) if end_turn and end_turn in turn else len(turn)
            _extend(tokenizer, ids, labels, prompt[len(done):], learn=False)
            _extend(tokenizer, ids, labels, turn[:cut], learn=index >= learn_from)
            done = prompt + turn[:cut]
    except TemplateError as exc:
        raise DataError(f"SFT record {record_id}: the chat template refused it: {exc}",
                        "fix the record's roles and their order (or drop it from the SFT set)") from None
    return ids, labels


def _extend(tokenizer: PreTrainedTokenizerBase, ids: list[int], labels: list[int], text: str, learn: bool) -> None:
    if not text:
        return
    piece = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids += piece
    labels += piece if learn else [IGNORE_INDEX] * len(piece)


def _not_incremental(tokenizer: PreTrainedTokenizerBase, record_id: str, index: int) -> ConfigError:
    return ConfigError(
        f"the tokenizer's chat template ({template_label(tokenizer)}) does not render the beginning of a "
        f"conversation as the beginning of the whole (SFT record {record_id}, message {index}), so its "
        "assistant turns cannot be masked for training (templates that rewrite earlier turns do this)",
        "give the base model a template that renders turns one after another (edit chat_template in its "
        "tokenizer files), or remove it there so model.chat_template (lmforge, chatml, llama3) is applied")
