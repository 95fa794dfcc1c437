"""What the pruner cost a finished run: each pruned trial of a stage trained to the end.

A pruned trial is stopped for being behind; whether it would have stayed behind is measured
here. Each PRUNED trial of one stage of a finished ``python -m tuner run`` is trained again
from its stored config (its own seed, so the same curve up to the epoch it was stopped at)
until it stops on its own, and its best validation score is held against the stage's best
COMPLETE trial, whose config is trained again in the same run as the baseline (training on
one CPU thread repeats a curve, so the ratio of the two retrained values is what the pruner
stood between). Each retrained config is also scored once on the test split, never used to
choose, to show what was lost.

Run on a finished run's storage (about 15 s a trial on 2 cores for MNIST-1D):

    python tests/benchmarks/bench_pruned.py sqlite:///runs/study.db --stage architecture
    python tests/benchmarks/bench_plain_starts.py --data mnist1d --out /tmp/r   # makes runs
    python tests/benchmarks/bench_pruned.py sqlite:////tmp/r/staged_adam_slow_s1/study.db

Prints, for the stage: its trials by state, the epoch each pruned trial was stopped at, and
each pruned trial's retrained best validation value and test accuracy against the stage
best's; then how many pruned trials beat it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def stage_study(storage: str, stage: str) -> Any:
    import optuna

    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    found = [n for n in names if n == stage or n.endswith(f"/{stage}")]  # <study>/<stage>
    if len(found) != 1:
        raise SystemExit(f"bench_pruned: no single study for stage {stage!r} in {names}")
    return optuna.load_study(study_name=found[0], storage=storage)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("storage", help="the run's storage URL")
    parser.add_argument("--stage", default="architecture")
    parser.add_argument("--lanes", type=int, default=2)
    args = parser.parse_args(argv)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = stage_study(args.storage, args.stage)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    if not complete:
        raise SystemExit(f"bench_pruned: stage {args.stage!r} has no COMPLETE trial")
    best = max(complete, key=lambda t: t.value if t.value is not None else -1.0)
    jobs = [best, *[t for t in pruned if "config" in t.user_attrs]]
    import bench_quality

    with ThreadPoolExecutor(args.lanes) as pool:  # one torch thread per retrain, one per core
        results = list(pool.map(lambda t: bench_quality.retrained(t.user_attrs["config"]), jobs))
    base_val, base_test = results[0]["accuracy"], results[0]["test"]
    print(f"\n{study.study_name}: {len(trials)} trials, {len(complete)} complete, "
          f"{len(pruned)} pruned (at epoch: "
          f"{', '.join(str(t.last_step) for t in pruned)})")  # fmt: skip
    print(f"stage best #{best.number}: stored {best.value:.4f}; retrained val {base_val:.4f}, "
          f"test {100 * base_test:.1f}%")  # fmt: skip
    head = ("trial", "pruned at", "val then", "val end", "/ best", "test")
    print("{:>6} {:>9} {:>8} {:>8} {:>7} {:>6}".format(*head))
    beat = 0
    for trial, result in zip(jobs[1:], results[1:], strict=True):
        val, test = result["accuracy"], result["test"]
        then = trial.intermediate_values.get(trial.last_step or 0, float("nan"))
        beat += val > base_val
        mark = "  beats the stage best" if val > base_val else ""
        print(f"{trial.number:>6} {trial.last_step!s:>9} {then:8.4f} {val:8.4f} "
              f"{val / base_val:7.4f} {100 * test:5.1f}%{mark}")  # fmt: skip
    print(f"{beat} of {len(jobs) - 1} pruned trials, trained to the end, beat the stage best's "
          f"retrained val {base_val:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
