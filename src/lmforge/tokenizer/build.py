"""The tokenizer stage: a byte-level BPE trained on the curated corpus, or a pretrained base's own.

Training, evaluation and serving all load the directory this writes (``ws.tokenizer_dir``): a
transformers ``PreTrainedTokenizerFast`` with our EOS/PAD specials and the shared chat template, so
``/v1/chat/completions`` renders prompts exactly as fine-tuning did.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.config.model import ModelConfig
from lmforge.core.errors import ConfigError, DataError
from lmforge.core.workspace import Workspace, atomic_dir
from lmforge.model.prompt import CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

# Texts are fed to the BPE trainer in chunks so a large corpus never sits in one Python list.
_CHUNK = 1000


def train_tokenizer(cfg: ModelConfig, ws: Workspace) -> Path:
    """Write a tokenizer to ``ws.tokenizer_dir`` and return that path.

    With ``cfg.base_model`` set, the base's tokenizer is copied (its vocabulary must match the
    base's embeddings); otherwise a byte-level BPE of ``cfg.vocab_size`` entries is trained on
    the curated training text plus the SFT instructions and responses.
    """
    if cfg.base_model:
        tokenizer = _pretrained_tokenizer(cfg.base_model)
    else:
        tokenizer = _train_bpe(cfg.vocab_size, ws)
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


def _train_bpe(vocab_size: int, ws: Workspace) -> PreTrainedTokenizerFast:
    return build_bpe(_corpus_chunks(ws), vocab_size)


def build_bpe(texts: Iterable[str | list[str]], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``texts`` (strings or lists of strings), wrapped for transformers
    with our special tokens and chat template. Tests build their tiny tokenizers with it too, so
    they exercise the production recipe."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    # add_prefix_space=False: "Hello" at the start of a prompt must encode the same way as in
    # the corpus, and prompts are rendered without a leading space.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
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
        chat_template=CHAT_TEMPLATE,
        model_max_length=1_000_000,
    )


def _pretrained_tokenizer(name: str) -> PreTrainedTokenizerBase:
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
    # The shared template ends answers with our EOS string; the base knows its own instead.
    tokenizer.chat_template = CHAT_TEMPLATE.replace(EOS_TOKEN, tokenizer.eos_token)
    return tokenizer


def _corpus_chunks(ws: Workspace) -> Iterator[list[str]]:
    import pyarrow.parquet as pq

    train_path = ws.curated_dir / "train.parquet"
    sft_path = ws.sft_dir / "train.jsonl"
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
                    record = json.loads(line)
                    chunk += [record["instruction"], record["response"]]
                if len(chunk) >= _CHUNK:
                    seen += len(chunk)
                    yield chunk
                    chunk = []
        seen += len(chunk)
        yield chunk
    if seen == 0:
        raise DataError(f"{train_path} holds no text to train a tokenizer on",
                        "check the curate stage's report.json: every document was filtered out")
