"""The whole pipeline on a user's own fine-tuning data, as `lmforge run` runs it: a chat file
(multi-turn, system prompts, a tool call and its result, one malformed line) and an Alpaca file read
through the `datasets` json loader, then a preference set tuned with `method: dpo` (LoRA). Real Prefect
server, MLflow on SQLite; training in-process and short, so each run takes well under a minute."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY, run_cli


# Distinct records (near-duplicates would be curated away): built-ins and the first line of their docs.
def _builtins() -> list[tuple[str, str]]:
    found: dict[str, str] = {}  # first doc line -> name: one record per distinct text
    for name in sorted(dir(builtins)):
        doc = (getattr(builtins, name).__doc__ or "").strip()
        if doc and not name.startswith("_"):
            found.setdefault(doc.splitlines()[0], name)
    return [(name, doc) for doc, name in found.items()][:120]


BUILTINS = _builtins()


def _chat(name: str, doc: str) -> dict:
    """A multi-turn chat: system prompt, a tool call and its result, a second user turn."""
    call = {"type": "function", "function": {"name": "lookup", "arguments": json.dumps({"name": name})}}
    return {"messages": [
        {"role": "system", "content": "You answer questions about Python built-ins."},
        {"role": "user", "content": f"What is `{name}`?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call-0", "name": "lookup", "content": doc},
        {"role": "assistant", "content": f"`{name}`: {doc}"},
        {"role": "user", "content": f"Is `{name}` always available?"},
        {"role": "assistant", "content": f"Yes, `{name}` is in the builtins module."},
    ]}


def _alpaca(name: str, doc: str) -> dict:
    return {"instruction": "Explain this built-in.", "input": name, "output": doc}


def _preference(name: str, doc: str) -> dict:
    return {"prompt": f"What does `{name}` do?", "chosen": doc, "rejected": f"`{name}` deletes your files."}


def _config(home: Path, method: str) -> Path:
    """configs/tiny.yaml with the user's sources, in-process training and fewer steps."""
    data_dir = home / "user-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    chat = data_dir / "chat.jsonl"
    chat.write_text("".join(json.dumps(_chat(*b)) + "\n" for b in BUILTINS[:40]) + "{not json\n")
    alpaca = data_dir / "alpaca.json"
    alpaca.write_text(json.dumps([_alpaca(*b) for b in BUILTINS[40:80]]))
    prefs = data_dir / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(_preference(*b)) + "\n" for b in BUILTINS[80:120]))
    config = yaml.safe_load((REPO / TINY).read_text())
    config["data"]["instructions"] = {"sources": [
        {"type": "local", "paths": [str(chat)]},
        {"type": "hf", "dataset": "json", "data_files": [str(alpaca)], "format": "alpaca"},
    ]}
    config["data"]["preferences"] = {"sources": [{"type": "local", "paths": [str(prefs)]}]}
    training = config["training"]
    training["pretrain"]["steps"] = 10
    training["finetune"]["steps"] = 6
    training["method"] = method
    training["placement"] = {"use_ray": False}
    config["model"]["max_seq_len"] = 256
    training["finetune"]["seq_len"] = 160
    config["registry"] = {"model_name": f"own-data-{method}"}
    path = home / f"own-{method}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(tmp_path: Path, method: str, prefect_server: str) -> dict:
    home = tmp_path / "home"
    result = run_cli(["run", str(_config(home, method)), "--json", "--no-deploy"], home,
                     env={"PREFECT_API_URL": prefect_server})
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_pipeline_fine_tunes_on_a_users_chat_and_alpaca_files(tmp_path, prefect_server):
    summary = _run(tmp_path, "lora", prefect_server)
    # Labels are TYPE[INDEX]; the chat file's malformed last line is skipped, the other records read.
    assert summary["instructions"]["sources"] == {"local[0]": {"read": 40, "skipped": 1},
                                                   "hf[1]": {"read": 40, "skipped": 0}}
    assert summary["instructions"]["train"] + summary["instructions"]["test"] == 80
    assert summary["version"] == "1" and summary["metrics"]["eval_num_examples"] > 0
    assert summary["metrics"]["finetune_loss"] > 0



def test_pipeline_tunes_on_a_users_preference_set_with_dpo(tmp_path, prefect_server):
    summary = _run(tmp_path, "dpo", prefect_server)
    assert summary["preferences"]["sources"] == {"local[0]": {"read": 40, "skipped": 0}}
    assert summary["preferences"]["train"] + summary["preferences"]["test"] == 40
    m = summary["metrics"]
    # DPO starts at log(2) with no margin (policy = reference) and learns to prefer the chosen answers.
    assert m["finetune_val_loss_start"] == pytest.approx(0.693147, abs=1e-4)
    assert m["finetune_val_reward_margin"] > m["finetune_val_reward_margin_start"] == 0
    assert m["finetune_val_loss"] < m["finetune_val_loss_start"]
    assert summary["promote"]["decision"] == "promoted" and summary["promote"]["rule"] == "first_version"
