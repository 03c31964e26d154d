"""``torchrun --nproc-per-node N -m lmforge.train CONFIG``: the run's ranks started by torchrun, without Ray
(``lmforge/train/torchrun.py``), as real processes on this machine's CPUs (gloo).

Rank 0 runs the train stage and hands its job to the others, which run the same worker; the run they make
is an ordinary one (saved model, history, parameters), sharded as configured. A rank 0 that fails before
training releases the others, which exit at once instead of waiting for a job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from lmforge.config.model import ModelConfig
from lmforge.config.training import TrainingConfig

MODEL = ModelConfig(vocab_size=384, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                    max_seq_len=64)
CONFIG = f"""model: {json.dumps(MODEL.model_dump(include={'vocab_size', 'hidden_size', 'num_layers', 'num_heads',
                                                         'num_kv_heads', 'intermediate_size', 'max_seq_len'}))}
training:
  method: pretrain
  pretrain: {{steps: 6, learning_rate: 0.01, batch_size: 4, seq_len: 32, warmup_steps: 2}}
  logging: {{every: 2}}
  parallel: {{strategy: fsdp}}
  placement: {{use_ray: false}}
"""


def torchrun(config: Path, home: Path, ranks: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", LMFORGE_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                           "-m", "lmforge.train", str(config), "--run-name", "torchrun"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # two torchrun ranks that import torch and transformers: ~20 s on a busy 2-core machine
def test_torchrun_ranks_train_one_sharded_run(tokenized_workspace, tmp_path):
    from transformers import AutoModelForCausalLM

    ws = tokenized_workspace("torchrun", MODEL)
    config = tmp_path / "fsdp.yaml"
    config.write_text(CONFIG)
    done = torchrun(config, ws.home)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])  # rank 0 alone prints the run's facts
    params = facts["params"]
    assert (params["world_size"], params["strategy"]) == (2, "fsdp")
    assert params["param_bytes_per_worker_pretrain"] == pytest.approx(params["params_total"] * 4 / 2, rel=0.05)
    result = json.loads((Path(facts["model_dir"]).parent / "train_result.json").read_text())
    losses = [row["loss"] for row in result["history"]]
    assert [row["step"] for row in result["history"]] == [1, 2, 4, 6] and losses[-1] < losses[0]
    model = AutoModelForCausalLM.from_pretrained(facts["model_dir"])
    assert model.config.vocab_size == MODEL.vocab_size
    assert not (ws.home / "checkpoints" / facts["run_id"]).exists()  # a finished run's scratch is removed


@pytest.mark.slow  # two torchrun ranks: ~10 s on a busy 2-core machine
def test_a_failed_rank_0_releases_the_other_ranks(tmp_path):
    config = tmp_path / "fsdp.yaml"
    config.write_text(CONFIG)
    # No data, no tokenizer: rank 0's stage stops at its checks. Rank 1, released, exits too: were it left waiting
    # for the job (4 hours), torchrun's run would outlast the subprocess's time box and fail the test.
    failed = torchrun(config, tmp_path / "empty-home")
    assert failed.returncode != 0
    assert "error:" in failed.stderr and "rank 0 stopped before training" in failed.stderr


def test_torchrun_ranks_form_the_group_sharding_needs(monkeypatch):
    fsdp = {"parallel": {"strategy": "fsdp"}, "placement": {"use_ray": False}}
    with pytest.raises(ValueError, match="nor did torchrun start the ranks"):
        TrainingConfig.model_validate(fsdp)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert TrainingConfig.model_validate(fsdp).parallel.strategy == "fsdp"
    tp = {"method": "pretrain", "parallel": {"strategy": "ddp", "tensor_parallel": 4}, "placement": {"use_ray": False}}
    with pytest.raises(ValueError, match="there are 3 workers"):  # torchrun's 3 ranks, not placement.num_workers, are counted
        TrainingConfig.model_validate(tp)
