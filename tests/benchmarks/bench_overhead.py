"""Engine overhead per trial: tuner vs the raw Optuna a user writes from the docs, same run.

Both sides run N trials of a trial that trains for no time at all, each on a fresh SQLite
file opened with tuner's settings (``tuner.storage.open_storage``), so what they measure is
the engine: sampling, pruning, recording, bookkeeping.

- raw Optuna: ``study.optimize(objective, n_trials=N)`` with ``TPESampler(seed=0)`` and
  ``MedianPruner()``; the objective suggests the lr stage's parameters (lr log-float,
  schedule categorical, warmup float), reports 12 epochs with ``trial.report`` +
  ``trial.should_prune()`` and returns.
- tuner: the lr stage of a one-stage study run by ``tuner.runner.run(check=False)`` as
  ``python -m tuner run`` runs it (tuner's TPE and median pruner, heartbeats, its trial
  records, the best trial's weights, the stage's diagnostics and note), with the objective
  in ``overhead_objective.py``: 12 epochs of ``report(epoch, metrics)``, then the metrics a
  real trial returns. Every trial reports the same curve, so no trial is pruned on either
  side: both report all 12 epochs.

Second figure: the share of a 2-second trial's wall time that is not training. A stage of
``--long`` trials whose objective computes for 2.0 s over its 12 epochs (torch matrix
products on one thread, measured inside the objective) runs through ``run``; overhead =
(stage wall time - time spent training) / stage wall time. The same trials in the raw Optuna
loop give the baseline.

Imports (torch, optuna-dashboard) are done, and each side's database is made, before
anything is timed: they are a process's and a database's start-up, not a trial's cost. Run:

    python tests/benchmarks/bench_overhead.py                 # 100 and 1000 trials, ~9 min
    python tests/benchmarks/bench_overhead.py --trials 100 --long 5 --rounds 1   # ~1 min

Prints ms per trial for each side and the ratio tuner/raw (target: at most 1.5x), then the
2-second trial's overhead on each side, per round and the median of the rounds (the sides
take turns; target for tuner: below 3%).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent))  # overhead_objective

import overhead_objective as fake

from tuner import runner
from tuner import storage as storages
from tuner.config import load_study

EPOCHS = 12  # the default study's epochs: 12 reports and pruning checks per trial
TRIAL_SECONDS = 2.0  # the "training" of a trial in the second figure

STUDY = """
name: overhead
objective: overhead_objective:train
metric: accuracy
direction: maximize
storage: sqlite:///{folder}/tuner.db
stages: [lr]
budget:
  trials: {{lr: {trials}}}
sampler: {{name: tpe}}        # tuner's TPE: multivariate, grouped
pruner: {{name: median}}      # MedianPruner() as on the raw side
defaults:
  seed: 0
  lr: 0.003
  schedule: onecycle
  warmup: 0.2
  epochs: {epochs}
  train_seconds: {seconds}
"""


def raw_optuna(trials: int, seconds: float = 0.0) -> float:
    """Seconds for ``trials`` trials of the docs' Optuna loop."""
    folder = Path(tempfile.mkdtemp(prefix="bench-raw-"))
    storage = storages.open_storage(f"sqlite:///{folder}/raw.db")

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 3e-4, 3e-2, log=True)
        schedule = trial.suggest_categorical("schedule", ["constant", "cosine", "onecycle"])
        warmup = trial.suggest_float("warmup", 0.0, 0.4)
        for epoch in range(1, EPOCHS + 1):
            fake.train_epoch(seconds / EPOCHS)
            trial.report(fake.curve(epoch), epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return fake.score(lr, str(schedule), warmup)

    study = optuna.create_study(
        storage=storage,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=0),
        pruner=optuna.pruners.MedianPruner(),
    )
    started = time.perf_counter()
    study.optimize(objective, n_trials=trials)
    return time.perf_counter() - started


def tuner_stage(trials: int, seconds: float = 0.0) -> float:
    """Seconds for a tuner run of one stage of ``trials`` trials."""
    folder = Path(tempfile.mkdtemp(prefix="bench-tuner-"))
    path = folder / "overhead.yaml"
    path.write_text(STUDY.format(folder=folder, trials=trials, epochs=EPOCHS, seconds=seconds))
    study = load_study(str(path))
    storages.open_storage(study.storage)  # its tables, as the raw side's (before the clock)
    started = time.perf_counter()
    runner.run(study, check=False, out=lambda line: None)
    return time.perf_counter() - started


def warm_up() -> None:
    """Pay the imports and first-use costs once, before anything is timed."""
    import optuna_dashboard  # noqa: F401  (the stage's note)
    import torch  # the best trial's weights, and the "training"

    torch.set_num_threads(1)  # as tuner trains: one torch thread per process

    raw_optuna(3)
    tuner_stage(3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--long", type=int, default=14, help="2-second trials (0: skip)")
    parser.add_argument("--rounds", type=int, default=3, help="of the 2-second trials (median)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    warm_up()
    for n in args.trials:
        raw = raw_optuna(n) / n * 1000
        ours = tuner_stage(n) / n * 1000
        print(f"{n:>5} trials  raw optuna {raw:7.1f} ms/trial   tuner {ours:7.1f} ms/trial"
              f"   ratio tuner/raw {ours / raw:.2f}x (target <= 1.5x)")  # fmt: skip
    if args.long:
        shares: dict[str, list[float]] = {"raw optuna": [], "tuner": []}
        for r in range(args.rounds):  # the sides take turns, each going first in turn
            sides = [("raw optuna", raw_optuna), ("tuner", tuner_stage)][:: 1 if r % 2 else -1]
            for name, side in sides:
                fake.TRAINED[0] = 0.0
                wall = side(args.long, TRIAL_SECONDS)
                trained = fake.TRAINED[0]
                shares[name].append((wall - trained) / wall)
                print(
                    f"round {r + 1}: {args.long} trials of {TRIAL_SECONDS:.0f} s  {name:<10}"
                    f"  wall {wall:6.2f} s, training {trained:6.2f} s:"
                    f" {shares[name][-1]:.2%} not training"
                )
        share = {name: statistics.median(values) for name, values in shares.items()}
        print(
            f"median of {args.rounds} rounds: raw optuna {share['raw optuna']:.2%}, tuner"
            f" {share['tuner']:.2%} of a 2-second trial is not training (target < 3%);"
            f" ratio tuner/raw {share['tuner'] / share['raw optuna']:.2f}x"
        )


if __name__ == "__main__":
    main()
