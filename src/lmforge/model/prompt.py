"""The named chat templates a model built from config can be given, and their special tokens.

Training, evaluation and the chat endpoint must render conversations identically or the model is
evaluated and served on a format it never saw; so each format lives here once, as the Jinja chat
template saved with the tokenizer (``model.chat_template`` picks one; a pretrained base keeps its
own). :mod:`lmforge.model.chat` renders and masks conversations through whichever template the
tokenizer carries.

- ``lmforge`` (the default): ``### Instruction:`` / ``### Response:`` blocks, each answer ended by EOS.
- ``chatml``: ``<|im_start|>role\\n...<|im_end|>``.
- ``llama3``: Llama-3 headers ``<|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>``.

Every template renders system, user, assistant (with tool calls, as ``<tool_call>`` JSON blocks),
tool messages and a ``tools`` list, and renders a prefix of a conversation as a prefix of the whole
(the masking in :mod:`lmforge.model.chat` relies on it).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.config.model import ChatTemplateName

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN]

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass(frozen=True)
class ChatTemplate:
    """A named template: its Jinja source and the special tokens it writes (beyond EOS and PAD)."""

    name: str
    source: str
    special_tokens: tuple[str, ...] = ()


# An assistant message's content, then each tool call as a JSON block. OpenAI records carry the
# arguments as a JSON string, transformers' convention is a mapping: both render as the same JSON.
_ASSISTANT_BODY = (
    "{%- set content = (message['content'] or '') | trim %}"
    "{{- content }}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set function = call['function'] if call['function'] is defined else call %}"
    "{%- if content or not loop.first %}{{- '\\n' }}{% endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + function['name'] + '\", \"arguments\": ' }}"
    "{%- if function['arguments'] is string %}{{- function['arguments'] }}"
    "{%- else %}{{- function['arguments'] | tojson }}{% endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
)

_TOOLS_LIST = "{%- for tool in tools %}{{- tool | tojson + '\\n' }}{%- endfor %}"

_TOOL_USE = ("To call a function, answer with {\"name\": ..., \"arguments\": ...} "
             "inside <tool_call></tool_call> tags.")

# The format lmforge always had, unchanged for instruction/response pairs: a one-turn chat renders
# exactly PROMPT_TEMPLATE, and the answer ends with the tokenizer's EOS.
LMFORGE_TEMPLATE = (
    "{%- if tools %}{{- '### Tools:\\n' }}" + _TOOLS_LIST + "{{- '" + _TOOL_USE + "\\n\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '### Response:\\n' }}" + _ASSISTANT_BODY + "{{- eos_token + '\\n\\n' }}"
    "{%- elif message['role'] == 'system' %}{{- '### System:\\n' + message['content'] | trim + '\\n\\n' }}"
    "{%- elif message['role'] == 'tool' %}{{- '### Tool result:\\n' + message['content'] | trim + '\\n\\n' }}"
    "{%- else %}{{- '### Instruction:\\n' + message['content'] | trim + '\\n\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '### Response:\\n' }}{%- endif %}"
)

# With tools, the tool list joins the system message (a first system message is merged into it).
CHATML_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' %}{{- messages[0]['content'] | trim + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\n<tools>\\n' }}" + _TOOLS_LIST + "{{- '</tools>\\n" + _TOOL_USE + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (tools and loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}" + _ASSISTANT_BODY +
    "{%- else %}{{- message['content'] | trim }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Llama 3 names the tool role "ipython"; the chat opens with the tokenizer's BOS, as Llama 3's does.
LLAMA3_TEMPLATE = (
    "{{- bos_token or '' }}"
    "{%- if tools %}{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' %}{{- messages[0]['content'] | trim + '\\n\\n' }}{%- endif %}"
    "{{- 'Functions, one JSON object a line:\\n' }}" + _TOOLS_LIST + "{{- '" + _TOOL_USE + "<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (tools and loop.first and message['role'] == 'system') %}"
    "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}" + _ASSISTANT_BODY +
    "{%- else %}{{- message['content'] | trim }}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

TEMPLATES: dict[str, ChatTemplate] = {
    "lmforge": ChatTemplate("lmforge", LMFORGE_TEMPLATE),
    "chatml": ChatTemplate("chatml", CHATML_TEMPLATE, ("<|im_start|>", "<|im_end|>")),
    "llama3": ChatTemplate("llama3", LLAMA3_TEMPLATE, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
}

# Kept under its old name: the template a tokenizer built without a configured name carries.
CHAT_TEMPLATE = LMFORGE_TEMPLATE


def chat_template(name: ChatTemplateName | str) -> ChatTemplate:
    """The named template (``model.chat_template``); the config already refuses unknown names."""
    return TEMPLATES[name]


def format_prompt(instruction: str) -> str:
    """The ``lmforge`` template's prompt for one instruction (probes and smoke checks that have no
    tokenizer at hand; conversations render through :func:`lmforge.model.chat.render_chat`)."""
    return PROMPT_TEMPLATE.format(instruction=instruction.strip())
