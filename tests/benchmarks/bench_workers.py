"""Worker scaling: finished trials per minute of one stage with workers=1 and workers=2.

The stage is the lr stage of ``studies/digits_mlp.yaml`` (a real MLP on scikit-learn's
digits), run by ``python -m tuner run workers=N`` as a user runs it: one torch thread per
worker (the default), a fresh SQLite file each time, pre-flight checks on (the default; they
run once, in the first process, whatever N is, while the other workers start and warm up).
Pruning and early stopping are off and the epochs fixed, so every trial is the same work
whatever the sampler draws (about 0.5 s on one thread here): the figure is the engine's, not
the luck of the draw.

Trials per minute = finished trials / (last trial's end - first trial's start), read from the
stored trials: the helper process's start-up counts where it outlasts the first process's
checks, the command's own start-up (Python, imports, the checks: the same for any N) does
not; the command's wall time is printed too. ``--checks off`` runs ``check=false``: then the
first trial of each process also pays torch's one-time cost of a process's first optimizer
(about 1 s), once with 1 worker and in both processes at once with 2. Needs both cores free:
run it on an otherwise idle machine.

The baseline is the machine itself: how much more training two processes get done than one.
Each round also times the digits MLP's training step in a plain torch loop (one thread) for
``--spin`` seconds, in one process and then in two at once. Two cores of a shared virtual
machine need not give twice one core's work (seen here: 1.55x to 2.24x for that loop); the
engine's own cost of a second worker is its scaling against that ceiling. Run:

    python tests/benchmarks/bench_workers.py               # 3 rounds of 40 trials, ~5 min
    python tests/benchmarks/bench_workers.py --trials 20 --rounds 1   # ~1 min
    python tests/benchmarks/bench_workers.py --checks off             # check=false

Prints, round by round (1 and 2 workers take turns, so that load on this shared machine hits
both alike), trials per minute of each and the machine's ceiling; then the medians: the
ratio 2 workers / 1 worker (target: at least 1.8x), the ceiling, and tuner's share of it.
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


def run(workers: int, trials: int, checks: bool = True) -> tuple[float, float]:
    """Trials per minute of the stage, and the command's wall time in seconds."""
    folder = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    path = study_file(folder, trials)
    command = [sys.executable, "-m", "tuner", "run", f"study={path}", f"workers={workers}",
               f"check={str(checks).lower()}"]  # fmt: skip
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


def spin(seconds: float) -> float:
    """Training steps per second of the digits MLP in a plain torch loop, one thread."""
    import torch

    from objectives.losses import build_loss
    from objectives.models import build_model
    from objectives.optim import build_optimizer

    torch.set_num_threads(1)
    config = yaml.safe_load((ROOT / "studies" / "digits_mlp.yaml").read_text())["defaults"]
    model = build_model(config["model"], 64, 10)
    optimizer, loss_fn = build_optimizer(model.parameters(), config), build_loss(config)
    x, y = torch.randn(int(config["batch_size"]), 64), torch.randint(0, 10, (64,))
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
    return steps / (time.perf_counter() - started)


def ceiling(seconds: float) -> float:
    """The machine's scaling: steps per second of two ``spin`` processes at once, over one's."""
    command = [sys.executable, str(Path(__file__).resolve()), f"--spin-once={seconds}"]

    def rates(n: int) -> list[float]:
        running = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
                   for _ in range(n)]  # fmt: skip
        return [float(p.communicate()[0].strip().splitlines()[-1]) for p in running]

    one = rates(1)[0]
    return sum(rates(2)) / one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3, help="each with 1 and 2 workers")
    parser.add_argument("--spin", type=float, default=8.0, help="seconds of each ceiling loop")
    parser.add_argument("--checks", choices=["on", "off"], default="on", help="pre-flight")
    parser.add_argument("--spin-once", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.spin_once:
        print(spin(args.spin_once))  # one process of ceiling()
        return
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    print(f"load before: {os.getloadavg()[0]:.2f} (1-minute average, 2 cores)")
    rates: dict[int, list[float]] = {1: [], 2: []}
    ceilings: list[float] = []
    for r in range(args.rounds):  # 1 and 2 workers take turns, each going first in turn
        ceilings.append(ceiling(args.spin))
        print(f"round {r + 1}: the machine: 2 torch loops at once do {ceilings[-1]:.2f}x one's"
              " steps", flush=True)  # fmt: skip
        for workers in (1, 2) if r % 2 == 0 else (2, 1):
            rate, wall = run(workers, args.trials, args.checks == "on")
            rates[workers].append(rate)
            print(f"round {r + 1}: workers={workers}: {rate:6.1f} trials/min   "
                  f"({args.trials} trials, command {wall:.1f} s)", flush=True)  # fmt: skip
    ratios = [two / one for one, two in zip(rates[1], rates[2], strict=True)]
    shares = [ratio / top for ratio, top in zip(ratios, ceilings, strict=True)]
    print(
        f"median of {args.rounds} rounds: workers=1 {statistics.median(rates[1]):.1f},"
        f" workers=2 {statistics.median(rates[2]):.1f} trials/min; ratio 2 workers / 1 worker"
        f" {statistics.median(ratios):.2f}x (target >= 1.8x); the machine's ceiling"
        f" {statistics.median(ceilings):.2f}x; tuner's scaling is {statistics.median(shares):.0%}"
        " of the ceiling"
    )


if __name__ == "__main__":
    main()
