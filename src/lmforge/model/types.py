"""The model types that engine signatures name, for annotations only (nothing heavy is imported).

A causal LM here is what the engine builds, trains, probes, saves and loads: a transformers
``PreTrainedModel`` (our bottleneck adapters are added inside one), or peft's ``PeftModel`` around
one for the methods peft implements (LoRA, QLoRA, IA3, LLaMA-Adapter, prefix and prompt tuning).
peft's wrapper is no ``PreTrainedModel``; it forwards missing attributes (``config``,
``generation_config``...) to the model inside, so code that takes either reads them alike.
Tokenizers need no alias: every kind is a transformers ``PreTrainedTokenizerBase``.

Import these names under ``if TYPE_CHECKING:`` with the classes they stand for: transformers and
peft take seconds to import, and the CLI loads modules whose signatures name them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

CausalLM: TypeAlias = "PreTrainedModel | PeftModel"
