"""Worker scaling: finished trials per minute of one stage with workers=1 and workers=2.

The stage is the lr stage of ``studies/digits_mlp.yaml`` (a real MLP on scikit-learn's
digits), run by ``python -m tuner run workers=N`` as a user runs it: one torch thread per
worker (the default), a fresh SQLite file each time, pre-flight checks off (they run once
whatever N is). Pruning and early stopping are off and the epochs fixed, so every trial is
the same work whatever the sampler draws (about 1 s on one thread here): the figure is the
engine's, not the luck of the draw.

Trials per minute = finished trials / (last trial's end - first trial's start), read from the
stored trials: the helper process's start-up counts (it starts with the first trial), the
command's own start-up (Python, imports: the same for any N) does not; the command's wall
time is printed too. Needs both cores free: run it on an otherwise idle machine. Run:

    python tests/benchmarks/bench_workers.py               # 3 rounds of 40 trials, ~4 min
    python tests/benchmarks/bench_workers.py --trials 20 --rounds 1   # ~1 min

Prints trials per minute for each, round by round (1 and 2 workers take turns, so that load
on this shared machine hits both alike), and the medians, with the median of the rounds'
ratios 2 workers / 1 worker (target: at least 1.8x).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 30  # digits_mlp's epochs: about a second of training per trial on one thread


def study_file(folder: Path, trials: int) -> Path:
    """digits_mlp with one stage, lr, and trials of equal work."""
    study = yaml.safe_load((ROOT / "studies" / "digits_mlp.yaml").read_text())
    study["stages"] = ["lr"]
    study["search_spaces"] = {k: v for k, v in study["search_spaces"].items() if k == "lr"}
    study["budget"] = {"trials": {"lr": trials}}  # no time limit: every trial finishes
    study["pruner"] = {"name": "none"}
    study["defaults"].update(epochs=EPOCHS, patience=EPOCHS)  # no early stopping
    study["storage"] = f"sqlite:///{folder}/tuner.db"
    path = folder / "bench_workers.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def run(workers: int, trials: int) -> tuple[float, float]:
    """Trials per minute of the stage, and the command's wall time in seconds."""
    folder = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    path = study_file(folder, trials)
    command = [sys.executable, "-m", "tuner", "run", f"study={path}", f"workers={workers}",
               "check=false"]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, cwd=folder, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    done = optuna.load_study(
        study_name="digits_mlp/lr", storage=f"sqlite:///{folder}/tuner.db"
    ).get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    assert len(done) == trials, f"{len(done)} of {trials} trials finished"
    first = min(t.datetime_start for t in done if t.datetime_start is not None)
    last = max(t.datetime_complete for t in done if t.datetime_complete is not None)
    return len(done) / (last - first).total_seconds() * 60, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3, help="each with 1 and 2 workers")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    print(f"load before: {os.getloadavg()[0]:.2f} (1-minute average, 2 cores)")
    rates: dict[int, list[float]] = {1: [], 2: []}
    for r in range(args.rounds):  # 1 and 2 workers take turns, each going first in turn
        for workers in (1, 2) if r % 2 == 0 else (2, 1):
            rate, wall = run(workers, args.trials)
            rates[workers].append(rate)
            print(f"round {r + 1}: workers={workers}: {rate:6.1f} trials/min   "
                  f"({args.trials} trials, command {wall:.1f} s)", flush=True)  # fmt: skip
    ratios = [two / one for one, two in zip(rates[1], rates[2], strict=True)]
    print(
        f"median of {args.rounds} rounds: workers=1 {statistics.median(rates[1]):.1f},"
        f" workers=2 {statistics.median(rates[2]):.1f} trials/min; ratio 2 workers / 1 worker"
        f" {statistics.median(ratios):.2f}x (target >= 1.8x)"
    )


if __name__ == "__main__":
    main()
