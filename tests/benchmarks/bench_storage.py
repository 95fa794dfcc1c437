"""Storage cost per trial: tuner's SQLite settings vs Optuna's default SQLite, same run.

A trial here does what a tuner trial does to the storage: 12 epochs of report +
should_prune (MedianPruner) and a dozen user attrs, with an instant objective, so the time
is all storage. Run:

    python tests/benchmarks/bench_storage.py [trials]

Prints ms per trial for each storage and the ratio default / tuner (higher is better).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import optuna

from tuner import storage as storages


def trial_cost(storage: optuna.storages.BaseStorage | None, trials: int) -> float:
    study = optuna.create_study(
        storage=storage, direction="maximize", pruner=optuna.pruners.MedianPruner()
    )

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        for epoch in range(1, 13):
            trial.report(x * epoch, epoch)
            trial.should_prune()
        for k in range(12):
            trial.set_user_attr(f"metric_{k}", x)
        return x

    started = time.perf_counter()
    study.optimize(objective, n_trials=trials)
    return (time.perf_counter() - started) / trials * 1000


def main() -> None:
    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    folder = Path(tempfile.mkdtemp())
    default = optuna.storages.RDBStorage(f"sqlite:///{folder}/default.db")
    ours = storages.open_storage(f"sqlite:///{folder}/tuner.db")
    # Interleave the two so that load on this shared machine hits both alike.
    cost = {"optuna default sqlite": 0.0, "tuner sqlite (WAL, synchronous=NORMAL)": 0.0}
    for _ in range(3):
        cost["optuna default sqlite"] += trial_cost(default, trials) / 3
        cost["tuner sqlite (WAL, synchronous=NORMAL)"] += trial_cost(ours, trials) / 3
    memory = trial_cost(None, trials)
    for name, ms in cost.items():
        print(f"{name:<42} {ms:8.1f} ms/trial")
    print(f"{'in-memory (no storage at all)':<42} {memory:8.1f} ms/trial")
    ratio = cost["optuna default sqlite"] / cost["tuner sqlite (WAL, synchronous=NORMAL)"]
    print(f"ratio default/tuner: {ratio:.2f}x  ({trials} trials x 3 rounds)")


if __name__ == "__main__":
    main()
