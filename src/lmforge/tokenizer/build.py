"""The tokenizer stage: a byte-level BPE trained on the curated corpus, or a pretrained base's own.

Training, evaluation and serving all load the directory this writes (``ws.tokenizer_dir``): a
transformers ``PreTrainedTokenizerFast`` with our EOS/PAD specials, the special tokens of the chat
template ``model.chat_template`` names (single tokens, never split into bytes) and that template, so
``/v1/chat/completions`` renders prompts exactly as fine-tuning did. A pretrained base keeps its
own template; only a base without one gets the named template.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.config.model import ChatTemplateName, ModelConfig
from lmforge.core.errors import ConfigError, DataError
from lmforge.core.workspace import Workspace, atomic_dir
from lmforge.data.sft import sft_file
from lmforge.model.chat import conversation, template_label
from lmforge.model.prompt import EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, TEMPLATES, chat_template

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

# Texts are fed to the BPE trainer in chunks so a large corpus never sits in one Python list.
_CHUNK = 1000


def train_tokenizer(cfg: ModelConfig, ws: Workspace) -> Path:
    """Write a tokenizer to ``ws.tokenizer_dir`` and return that path.

    With ``cfg.base_model`` set, the base's tokenizer is copied (its vocabulary must match the
    base's embeddings); otherwise a byte-level BPE of ``cfg.vocab_size`` entries is trained on
    the curated training text plus the text of the SFT records, with ``cfg.chat_template``.
    """
    if cfg.base_model:
        tokenizer = _pretrained_tokenizer(cfg.base_model, cfg.chat_template)
    else:
        tokenizer = build_bpe(_corpus_chunks(ws), cfg.vocab_size, template=cfg.chat_template)
    with atomic_dir(ws.tokenizer_dir) as tmp:
        tokenizer.save_pretrained(tmp)
    return ws.tokenizer_dir


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer directory written by :func:`train_tokenizer` (or any transformers one)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer_config.json").exists():
        raise DataError(f"no tokenizer at {path}",
                        "train one first: `python -m lmforge.train` (or the pipeline's tokenize stage)")
    return AutoTokenizer.from_pretrained(str(path))


def check_chat_template(tokenizer: PreTrainedTokenizerBase, cfg: ModelConfig, where: Path) -> None:
    """Refuse a tokenizer that carries another named template than ``model.chat_template``: the config
    changed since the tokenizer was built, and its special tokens are those of the old template."""
    label = template_label(tokenizer)
    if label in TEMPLATES and label != cfg.chat_template:
        raise ConfigError(f"the tokenizer at {where} renders chats with the {label!r} template, but "
                          f"model.chat_template is {cfg.chat_template!r}",
                          "rerun `lmforge tokenize CONFIG` to rebuild the tokenizer (and its special tokens) "
                          "for the configured template, or set model.chat_template back")


def build_bpe(texts: Iterable[str | list[str]], vocab_size: int, min_frequency: int = 2,
              template: ChatTemplateName = "lmforge") -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``texts`` (strings or lists of strings), wrapped for transformers
    with our special tokens, the named chat ``template`` and its special tokens. Tests build their
    tiny tokenizers with it too, so they exercise the production recipe."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    # add_prefix_space=False: "Hello" at the start of a prompt must encode the same way as in
    # the corpus, and prompts are rendered without a leading space.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    chat = chat_template(template)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        # The template's markers are special tokens: one id each, so its end-of-turn token can be
        # a stop id, and never merged with the text around it.
        special_tokens=SPECIAL_TOKENS + list(chat.special_tokens),
        # Every byte is in the vocabulary, so no input is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=min_frequency,
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    # GPT-2 convention: one document separator serves as BOS and EOS; padding is its own token so
    # a padded position is never mistaken for a real end of text.
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        chat_template=chat.source,
        model_max_length=1_000_000,
    )


def _pretrained_tokenizer(name: str, template: ChatTemplateName) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the tokenizer of base_model {name!r}: {exc}",
                          "set model.base_model to a local model directory (or a hub name when online)") from None
    if tokenizer.eos_token is None:
        raise ConfigError(f"the tokenizer of base_model {name!r} has no eos_token",
                          "choose a base model whose tokenizer defines an end-of-text token")
    # Adding a token would outgrow the base's embeddings, so padding reuses EOS (masked anyway).
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The base's own template is what it was tuned on (and what serving it elsewhere would use): kept as it is.
    if not tokenizer.chat_template:
        tokenizer.chat_template = _checked_template(tokenizer, name, template)
    return tokenizer


def _checked_template(tokenizer: PreTrainedTokenizerBase, name: str, template: ChatTemplateName) -> str:
    """The named template's source, if the base's vocabulary has its special tokens as single tokens
    (adding them would outgrow the base's embeddings)."""
    chat = chat_template(template)
    missing = [token for token in chat.special_tokens
               if tokenizer(token, add_special_tokens=False)["input_ids"] != [tokenizer.convert_tokens_to_ids(token)]]
    if missing:
        raise ConfigError(f"base_model {name!r} has no chat template, and model.chat_template {template!r} needs "
                          f"the special tokens {missing}, which its vocabulary lacks",
                          "set model.chat_template: lmforge (it ends turns with the base's own EOS token), or a "
                          "template whose tokens the base has")
    return chat.source


def _corpus_chunks(ws: Workspace) -> Iterator[list[str]]:
    import pyarrow.parquet as pq

    train_path = ws.curated_dir / "train.parquet"
    sft_path = sft_file(ws, "train")  # the curated set when there is one: no scrubbed PII in the vocabulary
    if not train_path.exists():
        raise DataError(f"no curated training text at {train_path}",
                        "run the collect and curate stages first (`lmforge curate`)")
    seen = 0
    for batch in pq.ParquetFile(train_path).iter_batches(batch_size=_CHUNK, columns=["text"]):
        texts = [t for t in batch.column(0).to_pylist() if t]
        seen += len(texts)
        yield texts
    if sft_path.exists():
        chunk: list[str] = []
        with sft_path.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    chunk += _record_texts(json.loads(line))
                if len(chunk) >= _CHUNK:
                    seen += len(chunk)
                    yield chunk
                    chunk = []
        seen += len(chunk)
        yield chunk
    if seen == 0:
        raise DataError(f"{train_path} holds no text to train a tokenizer on",
                        "check the curate stage's report.json: every document was filtered out")


def _record_texts(record: dict) -> list[str]:
    """The text of an SFT record (legacy pair or chat): every message's content and tool call."""
    messages, tools = conversation(record)
    texts = [str(message.get("content") or "") for message in messages]
    for message in messages:
        for call in message.get("tool_calls") or []:
            function = call.get("function", call)
            arguments = function.get("arguments", "")
            texts += [str(function.get("name", "")), arguments if isinstance(arguments, str) else json.dumps(arguments)]
    return texts + [json.dumps(tool) for tool in tools or []]
