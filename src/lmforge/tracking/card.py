"""The model card of a registered version: a markdown page generated from what MLflow already holds.

Everything on the card comes from the version and its run: the architecture and base (``model.*``
params, and the model directory's ``config.json`` when it is on this machine), the data digests
(``lmforge.data.*`` lineage tags), the instruction and preference reports (the collect manifest
logged under ``data_reports/``), the training config (``training.*`` params), the held-out metrics,
the lm-eval task scores (``task/<task>/<metric>`` metrics), the frozen evaluation set's digest and
the promotion decision (``lmforge.promotion.*`` tags). :func:`publish_card` writes it to
``MODEL_CARD.md`` in the model directory, logs it as ``model_card.md`` on the version's run, sets
the version's description to it (the MLflow UI renders that markdown) and names both places in
the ``lmforge.card`` / ``lmforge.card.path`` tags. It is published again whenever the decision changes.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.core.errors import RegistryError
from lmforge.core.workspace import atomic_write_text

if TYPE_CHECKING:
    from mlflow import MlflowClient

CARD_FILE = "MODEL_CARD.md"
CARD_ARTIFACT = "model_card.md"
TAG_CARD = "lmforge.card"  # runs:/<run_id>/model_card.md
TAG_CARD_PATH = "lmforge.card.path"  # the card in the model directory
MAX_DESCRIPTION = 5000  # MLflow's limit on a model version's description
# The training settings a reader needs; the run's params hold every other key.
TRAINING_KEYS = ("steps", "learning_rate", "batch_size", "grad_accum", "seq_len", "warmup_steps", "schedule")
ARCH_KEYS = ("architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "vocab_size", "max_position_embeddings")


@dataclass
class CardFacts:
    """What one card shows, gathered by :func:`card_facts` (plain data, so tests can render any)."""

    name: str
    version: str
    run_id: str
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    version_tags: dict[str, str] = field(default_factory=dict)
    architecture: dict[str, Any] = field(default_factory=dict)  # the model directory's config.json keys
    manifest: dict[str, Any] = field(default_factory=dict)  # the collect manifest, when it was logged
    model_dir: str | None = None


def card_facts(client: MlflowClient, name: str, version: str) -> CardFacts:
    """Read the facts of ``name`` version ``version`` and its run from MLflow (and the local model dir)."""
    found = client.get_model_version(name, version)
    if not found.run_id:
        raise RegistryError(f"version {version} of {name!r} names no MLflow run, so it has no facts for a model card",
                            "register versions with lmforge (`lmforge run` or `lmforge promote CONFIG`), which link the run")
    run = client.get_run(found.run_id)
    model_dir = run.data.tags.get("lmforge.model_dir")
    architecture: dict[str, Any] = {}
    if model_dir and (Path(model_dir) / "config.json").is_file():
        config = json.loads((Path(model_dir) / "config.json").read_text())
        architecture = {key: config[key] for key in ARCH_KEYS if key in config}
    return CardFacts(name=name, version=str(version), run_id=found.run_id, params=dict(run.data.params),
                     metrics=dict(run.data.metrics), version_tags=dict(found.tags), architecture=architecture,
                     manifest=_manifest(client, found.run_id), model_dir=model_dir)


def _manifest(client: MlflowClient, run_id: str) -> dict[str, Any]:
    """The collect manifest register logged beside the model (absent for a model registered by hand)."""
    if not any(a.path == "data_reports/manifest.json" for a in client.list_artifacts(run_id, "data_reports")):
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, "data_reports/manifest.json", tmp)).read_text())


def render_card(facts: CardFacts) -> str:
    """The card's markdown."""
    tags, params = facts.version_tags, facts.params
    lines = [f"# {facts.name} v{facts.version}", "",
             f"MLflow run `{facts.run_id}`; code `{tags.get('lmforge.code_version', '?')}`; "
             f"config hash `{tags.get('lmforge.config_hash', params.get('config_hash', '?'))}`.", ""]
    lines += _section("Model", [
        ("base", params.get("model.base_model") or "none (built from config)"),
        ("architecture", params.get("model.architecture")), ("chat template", params.get("model.chat_template")),
        *((f"config.json {k}", v) for k, v in facts.architecture.items()),
        ("parameters", params.get("params_total")),
    ])
    lines += _section("Data", [(k.removeprefix("lmforge.data.").removesuffix(".digest") + " digest", f"`{v}`")
                               for k, v in sorted(tags.items()) if k.startswith("lmforge.data.")])
    lines += _record_sets(facts.manifest)
    lines += _section("Training", [("method", params.get("training.method")), *_training_rows(params)])
    lines += _metrics(facts.metrics)
    lines += _section("Evaluation set", [("frozen set digest", _code(tags.get("lmforge.eval.frozen_set"))),
                                         ("tokenizer fingerprint", _code(tags.get("lmforge.eval.tokenizer")))])
    lines += _decision(tags)
    return "\n".join(lines).rstrip() + "\n"


def _section(title: str, rows: list[tuple[str, Any]]) -> list[str]:
    rows = [(k, v) for k, v in rows if v not in (None, "")]
    if not rows:
        return [f"## {title}", "", "(not recorded)", ""]
    return [f"## {title}", "", "| | |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in rows), ""]


def _training_rows(params: dict[str, str]) -> list[tuple[str, Any]]:
    """Steps, learning rate ... of each phase that ran (steps > 0), and the PEFT rank when LoRA trained."""
    rows: list[tuple[str, Any]] = []
    for phase in ("pretrain", "finetune"):
        if params.get(f"training.{phase}.steps", "0") in ("0", ""):
            continue
        rows += [(f"{phase} {k.replace('_', ' ')}", params.get(f"training.{phase}.{k}")) for k in TRAINING_KEYS]
    if "lora" in params.get("training.method", ""):
        rows += [("lora r", params.get("training.lora.r")), ("lora alpha", params.get("training.lora.alpha"))]
    return [*rows, ("seed", params.get("training.seed")), ("world size", params.get("world_size"))]


def _record_sets(manifest: dict[str, Any]) -> list[str]:
    """Records read and skipped per source of the instruction and preference sets."""
    lines: list[str] = []
    for title, key in (("Instruction data", "sft"), ("Preference data", "preferences")):
        written = manifest.get(key) or {}
        if not written.get("sources"):
            continue
        lines += [f"## {title}", "", f"{written.get('train', '?')} train / {written.get('test', '?')} test records.", "",
                  "| source | read | skipped |", "|---|---|---|"]
        lines += [f"| {label} | {r.get('read', '?')} | {r.get('skipped', '?')} |" for label, r in written["sources"].items()]
        lines.append("")
    return lines


def _metrics(metrics: dict[str, float]) -> list[str]:
    held_out = sorted((k, v) for k, v in metrics.items() if k.startswith("eval_"))
    tasks = sorted((k.removeprefix("task/"), v) for k, v in metrics.items() if k.startswith("task/"))
    lines = _section("Held-out metrics", [(k, v) for k, v in held_out])
    if tasks:
        lines += ["## lm-eval tasks", "", "| task / metric | value |", "|---|---|",
                  *(f"| {k} | {_cell(v)} |" for k, v in tasks), ""]
    return lines


def _decision(tags: dict[str, str]) -> list[str]:
    prefix = "lmforge.promotion."
    if f"{prefix}decision" not in tags and f"{prefix}promoted" not in tags:
        return ["## Promotion", "", "No decision recorded yet.", ""]
    lines = _section("Promotion", [
        ("decision", tags.get(f"{prefix}decision") or ("promoted" if tags.get(f"{prefix}promoted") == "true" else "rejected")),
        ("rule", tags.get(f"{prefix}rule")), ("metric", tags.get(f"{prefix}metric")),
        ("candidate", tags.get(f"{prefix}candidate_value")), ("champion", tags.get(f"{prefix}champion_value")),
        ("compared to", tags.get(f"{prefix}compared_to") and f"v{tags[prefix + 'compared_to']}"),
        ("decided at", tags.get(f"{prefix}decided_at")), ("reason", tags.get(f"{prefix}reason")),
    ])
    guardrails = json.loads(tags.get(f"{prefix}guardrails") or "[]")
    if guardrails:
        lines += ["| guardrail | candidate | champion | tolerance | passed |", "|---|---|---|---|---|"]
        lines += [f"| {g['metric']} | {_cell(g['candidate'])} | {_cell(g['champion'])} | "
                  f"{_cell(g['tolerance'])} {g.get('kind', '')} | {'yes' if g['passed'] else 'no'} |" for g in guardrails]
        lines.append("")
    approval = json.loads(tags.get(f"{prefix}approval") or "null")
    if approval:
        lines += [f"Approval: {approval.get('outcome')} by {approval.get('by') or '?'} via {approval.get('via') or '?'}"
                  + (f" — “{approval['comment']}”" if approval.get("comment") else ""), ""]
    for key, text in (("lmforge.rollback.demoted_to", "Rolled back: the alias moved from this version to v{}"),
                      ("lmforge.rollback.restored_from", "Restored by a rollback from v{}")):
        if tags.get(key):
            lines += [text.format(tags[key]) + f" at {tags.get(key.rsplit('.', 1)[0] + '.at', '?')}.", ""]
    return lines


def _code(value: str | None) -> str | None:
    return f"`{value}`" if value else None


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "-" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def publish_card(client: MlflowClient, name: str, version: str) -> dict[str, str | None]:
    """Generate the card and put it in the model directory (when on this machine) and in MLflow."""
    facts = card_facts(client, name, version)
    text = render_card(facts)
    path = None
    if facts.model_dir and Path(facts.model_dir).is_dir():
        path = str(Path(facts.model_dir) / CARD_FILE)
        atomic_write_text(Path(path), text)
    client.log_text(facts.run_id, text, CARD_ARTIFACT)
    artifact = f"runs:/{facts.run_id}/{CARD_ARTIFACT}"
    description = text if len(text) <= MAX_DESCRIPTION else (
        text[: MAX_DESCRIPTION - 200].rsplit("\n", 1)[0] + f"\n\n… the whole card: `{artifact}`\n")
    client.update_model_version(name, version, description=description)
    client.set_model_version_tag(name, version, TAG_CARD, artifact)
    if path:
        client.set_model_version_tag(name, version, TAG_CARD_PATH, path)
    return {"path": path, "artifact": artifact}
