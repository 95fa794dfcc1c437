"""A one-stage study around a plain-Python objective, for tests of the engine's mechanics
(workers, heartbeats, interrupts) where training itself is beside the point."""

import sys
from pathlib import Path

OBJECTIVE = '''
import math, os, time

import torch

def train(config, report, test=False):
    """Peaks at lr = 1e-2; sleeps per epoch so that trials overlap across workers."""
    value = 1.0 - (math.log10(config["lr"]) + 2.0) ** 2 / 10
    for epoch in range(1, config["epochs"] + 1):
        time.sleep(config["sleep"])
        report(epoch, {"accuracy": value})
    result = {"accuracy": value, "stop_reason": "max_epochs", "pid": os.getpid(),
              "threads": torch.get_num_threads()}
    if test:
        result["test"] = {"accuracy": value}
    return result
'''

STUDY = """
name: fake
objective: fakeobj:train
metric: accuracy
direction: maximize
storage: sqlite:///tuner.db
stages: [lr]
budget:
  trials: {{lr: {trials}}}
sampler: {{name: random}}
# The mechanics under test (budgets, workers, signals) count trials: no stop rule ends a stage
# early, no re-scoring trains beside them, and no widening adds trials when a random draw's
# best lands at an edge (tests/test_closed_loop.py tests those).
loop: {{stagnation: false, rescore: false, widen: false}}
pruner: {{name: none}}
defaults:
  seed: 0
  lr: 0.003
  schedule: onecycle
  warmup: 0.2
  epochs: {epochs}
  sleep: {sleep}
"""


def write(folder: Path, trials: int = 6, epochs: int = 2, sleep: float = 0.05) -> Path:
    """Write fakeobj.py and fake.yaml into ``folder``; returns the study file."""
    sys.modules.pop("fakeobj", None)  # an in-process run imports this folder's copy
    (folder / "fakeobj.py").write_text(OBJECTIVE)
    study = folder / "fake.yaml"
    study.write_text(STUDY.format(trials=trials, epochs=epochs, sleep=sleep))
    return study
