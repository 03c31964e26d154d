"""The one prompt format shared by fine-tuning, evaluation and serving.

Training, evaluation and the chat endpoint must render instructions identically or the model is
evaluated and served on a format it never saw; so the format lives here once, and the same text is
saved as the tokenizer's chat template for ``/v1/chat/completions``.
"""

from __future__ import annotations

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN]

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"

# Jinja chat template equivalent to PROMPT_TEMPLATE for a single user turn; system and earlier
# turns are rendered in the same block style so multi-turn chats stay readable to the model.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '### Response:\\n' + message['content'] + '" + EOS_TOKEN + "' + '\\n\\n' }}"
    "{% elif message['role'] == 'system' %}"
    "{{ '### System:\\n' + message['content'] + '\\n\\n' }}"
    "{% else %}"
    "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)


def format_prompt(instruction: str) -> str:
    """The text the model sees before it answers ``instruction``."""
    return PROMPT_TEMPLATE.format(instruction=instruction.strip())


def format_example(instruction: str, response: str) -> tuple[str, str]:
    """(prompt, completion) for supervised fine-tuning; the loss covers the completion only."""
    return format_prompt(instruction), response.strip() + EOS_TOKEN
