"""Which trial score picks the configs that score best on test: the best single epoch, or the
best mean over a few consecutive epochs (tuner's ``loop.smooth``)?

It reads the studies that ``bench_plain_starts.py`` (or ``bench_quality.py``) left in their
``--out`` folder: every COMPLETE trial there recorded its validation curve (Optuna's
intermediate values) and its own model's test accuracy (never used to choose). For each score
it prints the mean test accuracy of the top-k trials of all runs pooled, and of the trial each
run's score ranks first, with the ratio against the best single epoch. Accuracy on a few
hundred samples ties often (many trials at 99.25%): ties are broken at random, and each figure
is the mean over 300 such draws. Run:

    python tests/benchmarks/bench_plain_starts.py --out /tmp/plain    # writes the studies
    python tests/benchmarks/smoothing.py /tmp/plain                   # reads them
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def curves(folder: Path) -> dict[str, list[tuple[list[float], float]]]:
    """Per run (a study.db under ``folder``): each COMPLETE trial's curve and test accuracy
    (the batch-size race's trials left out: they train for a time, not for epochs)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    runs: dict[str, list[tuple[list[float], float]]] = {}
    for db in sorted(folder.rglob("study.db")):
        url = f"sqlite:///{db}"
        rows = runs.setdefault(str(db.parent.relative_to(folder)), [])
        for summary in optuna.get_all_study_summaries(url):
            if summary.study_name.endswith("/batch_size"):
                continue
            study = optuna.load_study(study_name=summary.study_name, storage=url)
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
                test = t.user_attrs.get("test_accuracy")
                if test is not None and t.intermediate_values:
                    curve = [t.intermediate_values[k] for k in sorted(t.intermediate_values)]
                    rows.append((curve, float(test)))
    return {name: rows for name, rows in runs.items() if rows}


def main() -> None:
    from tuner.closed_loop import smoothed_peak

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    runs = curves(args.folder)
    pooled = [row for rows in runs.values() for row in rows]
    if not pooled:
        sys.exit(f"no trials with a curve and a test accuracy under {args.folder}")
    print(f"{len(pooled)} trials of {len(runs)} runs under {args.folder}")
    top_head = f"top-{args.top} test"
    print(f"{'score':<28} {top_head:>12} {'per-run pick':>13}   ratios (top, pick)")
    rng = random.Random(0)
    base = None
    for window in (1, 2, 3, 4):
        score = {id(row): smoothed_peak(row[0], window) or 0.0 for row in pooled}
        tops, picks = [], []
        for _ in range(300):  # ties broken at random: the mean over the draws
            shuffled = rng.sample(pooled, len(pooled))
            top = sorted(shuffled, key=lambda row: -score[id(row)])[: args.top]
            tops.append(statistics.fmean(test for _, test in top))
            picks.append(statistics.fmean(
                max(rng.sample(rows, len(rows)), key=lambda r: score[id(r)])[1]
                for rows in runs.values()
            ))  # fmt: skip
        top_test, pick = statistics.fmean(tops), statistics.fmean(picks)
        base = base or (top_test, pick)
        name = "best single epoch" if window == 1 else f"best mean of {window} epochs"
        print(f"{name:<28} {100 * top_test:>11.2f}% {100 * pick:>12.2f}%"
              f" {top_test / base[0]:>7.4f} {pick / base[1]:>7.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
