"""Chat templates and masking: each named template, a base's own template, and the saved model's template.

The loss-mask tests decode the tokens whose labels are not IGNORE_INDEX and check they are exactly
the assistant turns (content, tool calls, end-of-turn token) of a multi-turn chat with a system
prompt, tools, a tool call and its result.
"""

from __future__ import annotations

import json
from typing import get_args

import pytest
import torch
from tiny_assets import CORPUS, SFT

from lmforge.config.loader import parse_config
from lmforge.config.model import ChatTemplateName, ModelConfig
from lmforge.core.errors import ConfigError, DataError
from lmforge.core.workspace import Workspace
from lmforge.data.packing import IGNORE_INDEX
from lmforge.model.chat import end_of_turn, render_chat, stop_token_ids, template_label
from lmforge.model.prompt import EOS_TOKEN, TEMPLATES, chat_template
from lmforge.serving.engine import Engine
from lmforge.tokenizer.build import build_bpe, load_tokenizer, train_tokenizer
from lmforge.train.artifacts import save_full
from lmforge.train.data import encode_sft

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CHAT = {
    "id": "chat-1",
    "tools": TOOLS,
    "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call-1", "name": "get_weather", "content": "18 degrees, sunny"},
        {"role": "assistant", "content": "It is 18 degrees and sunny."},
        {"role": "user", "content": "And what does `len` do?"},
        {"role": "assistant", "content": "Return the number of items in a container."},
    ],
}
TOOL_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
END = {"lmforge": EOS_TOKEN, "chatml": "<|im_end|>", "llama3": "<|eot_id|>"}


def _tokenizer(template: str):
    return build_bpe(CORPUS * 4 + [json.dumps(r) for r in SFT], 400, min_frequency=0, template=template)


def _learned_runs(tokenizer, input_ids: torch.Tensor, labels: torch.Tensor) -> list[str]:
    """The decoded stretches of consecutive tokens the loss covers."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(input_ids.tolist(), labels.tolist(), strict=True):
        learned = label != IGNORE_INDEX
        if learned:
            assert label == token  # a learned position's label is its own token (the loop shifts)
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = learned
    return [tokenizer.decode(run) for run in runs]


def test_config_names_are_the_templates():
    assert set(get_args(ChatTemplateName)) == set(TEMPLATES)
    assert parse_config({"model": {"chat_template": "chatml"}}).model.chat_template == "chatml"
    with pytest.raises(ConfigError, match="chat_template") as info:
        parse_config({"model": {"chat_template": "vicuna"}})
    assert "llama3" in str(info.value)  # the error lists the names there are


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_assistant_turn_and_nothing_else_is_learned(name):
    tokenizer = _tokenizer(name)
    end = END[name]
    for token in (*chat_template(name).special_tokens, end):  # the template's markers are single tokens
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(token)]
    assert end_of_turn(tokenizer) == end and tokenizer.convert_tokens_to_ids(end) in stop_token_ids(tokenizer)
    assert template_label(tokenizer) == name
    rows = encode_sft([CHAT], tokenizer, seq_len=1024)
    assert _learned_runs(tokenizer, rows["input_ids"][0], rows["labels"][0]) == [
        TOOL_CALL + end, "It is 18 degrees and sunny." + end, "Return the number of items in a container." + end]
    # Every other token is a prompt: the system, user and tool turns and the tool list are in it.
    prompt = tokenizer.decode(rows["input_ids"][0][rows["labels"][0] == IGNORE_INDEX])
    for text in ("Answer briefly.", "What is the weather in Paris?", "18 degrees, sunny", "get_weather"):
        assert text in prompt
    # The rows are the whole rendered chat, tokenized: what serving renders before each answer.
    assert tokenizer.decode(rows["input_ids"][0][rows["attention_mask"][0] == 1]) == render_chat(
        tokenizer, CHAT["messages"], TOOLS).rstrip()


def test_a_long_chat_keeps_its_first_turns_and_a_prompt_past_seq_len_drops_it():
    tokenizer = _tokenizer("chatml")
    full = encode_sft([CHAT], tokenizer, seq_len=1024)
    n = int(full["attention_mask"][0].sum())
    first_answer = int((full["labels"][0] != IGNORE_INDEX).nonzero()[0])
    cut = encode_sft([CHAT], tokenizer, seq_len=first_answer + 1)  # the first learned token just fits
    assert torch.equal(cut["input_ids"][0], full["input_ids"][0, : first_answer + 1]) and n > first_answer + 1
    too_short = {"id": "x", "messages": [CHAT["messages"][1], CHAT["messages"][4]]}
    with pytest.raises(DataError, match="all 1 SFT examples"):
        encode_sft([too_short], tokenizer, seq_len=4)


def test_a_template_that_rewrites_earlier_turns_is_refused():
    tokenizer = _tokenizer("lmforge")
    # Like reasoning templates that drop earlier answers' thoughts: an earlier reply renders differently.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[earlier answer]"
        "{% else %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ConfigError, match="does not render the beginning of a conversation") as info:
        encode_sft([CHAT], tokenizer, seq_len=1024)
    assert "chat-1" in info.value.cause and "model.chat_template" in info.value.fix


def _base_dir(tmp_path, template: str | None):
    """A pretrained-style tokenizer directory (no weights needed to read its tokenizer)."""
    tokenizer = _tokenizer("lmforge")
    tokenizer.chat_template = template
    path = tmp_path / f"base-{len(list(tmp_path.glob('base-*')))}"
    tokenizer.save_pretrained(path)
    return str(path)


def test_a_base_keeps_its_own_template_and_one_without_gets_the_named_one(tmp_path):
    own = ("{% for m in messages %}{{ '<|user|>\\n' if m['role'] == 'user' else '<|assistant|>\\n' }}"
           "{{ m['content'] + eos_token + '\\n' }}{% endfor %}{% if add_generation_prompt %}<|assistant|>\\n{% endif %}")
    ws = Workspace(tmp_path / "home")
    for chosen in ("chatml", "lmforge"):  # the configured name never replaces a base's template
        train_tokenizer(ModelConfig(base_model=_base_dir(tmp_path, own), chat_template=chosen), ws)
        assert load_tokenizer(ws.tokenizer_dir).chat_template == own
    train_tokenizer(ModelConfig(base_model=_base_dir(tmp_path, None)), ws)
    assert template_label(load_tokenizer(ws.tokenizer_dir)) == "lmforge"
    with pytest.raises(ConfigError, match=r"needs the special tokens \['<\|im_start\|>'") as info:
        train_tokenizer(ModelConfig(base_model=_base_dir(tmp_path, None), chat_template="chatml"), ws)
    assert "chat_template: lmforge" in info.value.fix


def test_the_saved_model_carries_its_template_and_serving_renders_and_stops_with_it(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer("chatml")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, bos_token_id=None,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    save_full(model, tokenizer, tmp_path)
    saved = load_tokenizer(tmp_path / "model")
    assert saved.chat_template == chat_template("chatml").source
    engine = Engine.load(tmp_path / "model", device="cpu")
    try:
        messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What does `len` do?"}]
        prompt = engine.render_chat(messages)
        assert prompt == render_chat(tokenizer, messages, add_generation_prompt=True)
        assert prompt.endswith("<|im_start|>assistant\n") and "<|im_start|>system\nAnswer briefly.<|im_end|>" in prompt
        assert tokenizer.convert_tokens_to_ids("<|im_end|>") in engine.eos_ids
    finally:
        engine.close()


def test_training_refuses_a_tokenizer_built_for_another_template(tmp_path):
    from lmforge.config.training import TrainingConfig
    from lmforge.train.launch import check_inputs

    ws = Workspace(tmp_path / "home")
    _tokenizer("chatml").save_pretrained(ws.tokenizer_dir)
    with pytest.raises(ConfigError, match="renders chats with the 'chatml' template") as info:
        check_inputs(TrainingConfig(), ModelConfig(chat_template="llama3"), ws)
    assert "lmforge tokenize" in info.value.fix
