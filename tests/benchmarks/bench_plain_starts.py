"""From a user's plain defaults: the staged study vs one joint Optuna search, side by side.

A user does not arrive with an expert's recipe. Each plain start is a copy of a bundled study
file whose ``defaults:`` are plain (a common optimizer at a common lr, a constant schedule, no
warm-up, no normalization, ReLU, no label smoothing, no weight decay); the search spaces, the
loop, the data and the budget are the study's own. Each side is given:

- staged: ``python -m tuner run study=<the copy> timeout=B seed=S`` — the stages in order, the
  closed loop (widen, rescore, the follow-up with more epochs, stop rule) and the pre-flight
  checks, one torch thread;
- joint: one Optuna study over the union of the stages' search spaces (the same ranges the
  stages start from, built from tuner's own search-space files around the same plain
  defaults), ``TPESampler(seed=S)`` + ``MedianPruner()``, **the plain defaults enqueued as its
  first trial**, ``study.optimize(timeout=B)``, the same training loop, one torch thread.

An optional third side, ``joint_smooth`` (``--sides staged joint joint_smooth``), is the joint
search scoring each trial as tuner does (``loop.smooth``: the best mean of 3 consecutive epochs
instead of the best single one): it tells what the staging buys from what the scoring buys.

Both train ``objectives.loop.train``; each trial also records its model's test accuracy
(never used to choose) for the time until the incumbent first reaches 98% test. At the end,
each side's winner (the staged run's ``tuner export``; the joint study's best trial) is
retrained from its config and scored once on the test split. Jobs run two at a time (one per
core), the two sides of one (start, seed) side by side.

Run (about 45 min per data set on 2 cores with the defaults):

    python tests/benchmarks/bench_plain_starts.py --data mnist1d
    python tests/benchmarks/bench_plain_starts.py --data digits
    python tests/benchmarks/bench_plain_starts.py --data digits --seeds 0 --budget 60  # smoke

Prints, per start: test accuracy of each side's winner (mean and per seed), the ratio
staged/joint, the time to 98% test and the share of the budget each side used.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

TARGET = 0.98
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
STUDIES = {"mnist1d": "mnist1d_cnn", "digits": "digits_mlp"}
_PLAIN = {"schedule": "constant", "warmup": 0.0, "label_smoothing": 0.0, "weight_decay": 0.0,
          "model.norm": "none", "model.activation": "relu", "model.dropout": 0.0}  # fmt: skip
# Three plain starts per data set: Adam at a common lr, SGD with momentum, Adam too slow.
STARTS: dict[str, dict[str, dict[str, Any]]] = {
    "mnist1d": {
        "adam": {**_PLAIN, "optimizer": "adam", "lr": 1e-3, "batch_size": 32,
                 "model.width": 16, "model.depth": 4},
        "sgd": {**_PLAIN, "optimizer": "sgd", "lr": 1e-2, "momentum": 0.9, "batch_size": 64,
                "model.width": 32, "model.depth": 4},
        "adam_slow": {**_PLAIN, "optimizer": "adam", "lr": 1e-4, "batch_size": 128,
                      "model.width": 24, "model.depth": 3},
    },
    "digits": {
        "adam": {**_PLAIN, "optimizer": "adam", "lr": 1e-3, "batch_size": 32,
                 "model.width": 64, "model.depth": 2},
        "sgd": {**_PLAIN, "optimizer": "sgd", "lr": 1e-2, "momentum": 0.9, "batch_size": 64,
                "model.width": 128, "model.depth": 1},
        "adam_slow": {**_PLAIN, "optimizer": "adam", "lr": 1e-4, "batch_size": 128,
                      "model.width": 64, "model.depth": 3},
    },
}  # fmt: skip


def study_file(data: str, start: str, folder: Path) -> Path:
    """A copy of the bundled study whose defaults are the plain start."""
    from tuner import yamlio
    from tuner.config import STUDIES_DIR
    from tuner.nested import merged

    document = yamlio.load(STUDIES_DIR / f"{STUDIES[data]}.yaml")
    document["defaults"] = merged(document["defaults"], STARTS[data][start])
    document["objective"] = "bench_quality:train"  # records each trial's test accuracy
    document["name"] = f"{STUDIES[data]}_{start}"
    path = folder / "study.yaml"
    path.write_text(yamlio.dumps(document))
    return path


# --- the joint side ------------------------------------------------------------------------


def joint_space(path: Path) -> dict[str, Any]:
    """The union of the staged study's search spaces around its defaults, by config key:
    categorical choices joined, float and int ranges spanning every stage's (an ``around``
    range evaluated for every optimizer), conditions kept."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from search_spaces import grid_points
    from tuner.config import load_study
    from tuner.plan import load_space

    study = load_study(str(path))
    incumbent = study.config
    space: dict[str, Any] = {}
    for stage in study.stages:
        stage_space = load_space(study, stage)
        if stage_space.grid:
            sizes = [p["batch_size"] for p in grid_points(stage_space, incumbent)]
            space["batch_size"] = {"choices": sorted(set(sizes)), "when": {}}
            continue
        for param in stage_space.params:
            views = [incumbent]
            if param.per == "optimizer":
                views = [
                    {**incumbent, "optimizer": o} for o in ("sgd", "adam", "adamw", "rmsprop")
                ]
            for view in views:
                dist = param.distribution(view, incumbent)
                entry = space.setdefault(param.key, {"when": dict(param.when)})
                if isinstance(dist, CategoricalDistribution):
                    seen = entry.setdefault("choices", [])
                    seen += [c for c in dist.choices if c not in seen]
                else:
                    entry["low"] = min(entry.get("low", math.inf), dist.low)
                    entry["high"] = max(entry.get("high", -math.inf), dist.high)
                    entry["log"] = bool(getattr(dist, "log", False))
                    entry["int"] = not isinstance(dist, FloatDistribution)
    return space


def run_joint(path: Path, seed: int, budget: float, storage: str, smooth: int = 1) -> None:
    import bench_quality
    import optuna
    import torch

    from tuner.closed_loop import smoothed_peak
    from tuner.config import load_study
    from tuner.nested import get_path, set_path

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_config = load_study(str(path))
    base = dict(study_config.config, seed=seed)
    space = joint_space(path)

    def objective(trial: optuna.Trial) -> float:
        import copy

        config = copy.deepcopy(base)
        for key, spec in space.items():
            if not all(get_path(config, k) in v for k, v in spec["when"].items()):
                continue
            if "choices" in spec:
                value = trial.suggest_categorical(key, spec["choices"])
            elif spec["int"]:
                value = trial.suggest_int(
                    key, int(spec["low"]), int(spec["high"]), log=spec["log"]
                )
            else:
                value = trial.suggest_float(key, spec["low"], spec["high"], log=spec["log"])
            set_path(config, key, value)
        trial.set_user_attr("config", config)

        curve: list[float] = []

        def report(epoch: int, metrics: Mapping[str, float]) -> None:
            curve.append(float(metrics["accuracy"]))
            trial.report(metrics["accuracy"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        result = bench_quality.train(config, report)
        if "accuracy" not in result:
            raise optuna.TrialPruned()
        trial.set_user_attr("test_accuracy", result["test_accuracy"])
        smoothed = smoothed_peak(curve, smooth) if smooth > 1 else None
        return float(result["accuracy"]) if smoothed is None else smoothed

    study = optuna.create_study(storage=storage, direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner())  # fmt: skip
    first = {}
    for key, spec in space.items():
        if all(get_path(base, k) in v for k, v in spec["when"].items()):
            value = get_path(base, key)
            if "choices" not in spec:  # as the stages do: a value off its range, to its edge
                value = type(value)(min(max(value, spec["low"]), spec["high"]))
            first[key] = value
    study.enqueue_trial(first)  # the plain defaults: the staged side's first trial too
    study.optimize(objective, timeout=budget)


# --- jobs ---------------------------------------------------------------------------------------


def run_job(job: dict[str, Any], out: Path) -> dict[str, Any]:
    import bench_quality

    folder = out / job["name"]
    folder.mkdir(parents=True, exist_ok=True)
    path = study_file(job["data"], job["start"], folder)
    url = f"sqlite:///{folder / 'study.db'}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)])}
    if job["side"] == "staged":
        command = [sys.executable, "-m", "tuner", "run", f"study={path}",
                   f"timeout={job['budget']}", f"seed={job['seed']}",
                   f"storage={url}"]  # fmt: skip
    else:
        smooth = 3 if job["side"] == "joint_smooth" else 1
        command = [sys.executable, str(Path(__file__).resolve()), "--joint", f"--study={path}",
                   f"--seed={job['seed']}", f"--budget={job['budget']}",
                   f"--storage={url}", f"--smooth={smooth}"]  # fmt: skip
    started = time.time()
    with open(folder / "log.txt", "w") as log:
        code = subprocess.call(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - started
    if code != 0:
        raise RuntimeError(f"{job['name']} exited {code}: see {folder / 'log.txt'}")
    trials = bench_quality._trials(url, started)
    if job["side"] == "staged":
        done = subprocess.run(
            [sys.executable, "-m", "tuner", "export", f"study={path}", f"storage={url}",
             "out=best.yaml"], cwd=folder, env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        del done
        from tuner import yamlio

        winner = yamlio.load(folder / "best.yaml")["config"]
        ended = [line for line in (folder / "log.txt").read_text().splitlines()
                 if line.startswith("run ended")]  # fmt: skip
        job["ended"] = ended[-1] if ended else "?"
    else:
        # What it had found by its budget: ``optimize(timeout=)`` lets the trial running at
        # the timeout finish (up to 33 s late seen), while staged trials end by the deadline.
        best = bench_quality.incumbent(trials, "joint", job["budget"])
        winner = None if best is None else best["config"]
        job["ended"] = "timeout"
    last = max((t["end"] for t in trials), default=0.0)
    reach = bench_quality.time_to(trials, job["side"], TARGET)
    return {**job, "wall": wall, "used": min(last, wall) / job["budget"], "trials": trials,
            "winner": winner, "reach": reach}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=sorted(STUDIES), default="mnist1d")
    parser.add_argument("--starts", nargs="+", default=None, help="default: all three")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=float, default=300)
    parser.add_argument("--lanes", type=int, default=2)
    parser.add_argument(
        "--sides",
        nargs="+",
        choices=("staged", "joint", "joint_smooth"),
        default=["staged", "joint"],
        help="which sides to run",
    )
    parser.add_argument("--out", default=None)
    parser.add_argument("--joint", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--study", default="", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--storage", default="", help=argparse.SUPPRESS)
    parser.add_argument("--smooth", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.joint:
        run_joint(Path(args.study), args.seed, args.budget, args.storage, args.smooth)
        return
    import bench_quality

    out = Path(args.out or tempfile.mkdtemp(prefix="bench_plain_"))
    out.mkdir(parents=True, exist_ok=True)
    starts = args.starts or list(STARTS[args.data])
    jobs = [{"data": args.data, "start": st, "seed": s, "side": side, "budget": args.budget,
             "name": f"{args.data}_{st}_s{s}_{side}"}
            for st in starts for s in args.seeds for side in args.sides]  # fmt: skip
    print(f"{len(jobs)} jobs of {args.budget:.0f}s in {args.lanes} lanes; in {out}", flush=True)
    from objectives.data import load as load_data  # data made before any clock starts
    from tuner.config import load_study

    load_data(load_study(STUDIES[args.data]).defaults["data"], 0,
              __import__("torch").device("cpu"))  # fmt: skip
    with ThreadPoolExecutor(args.lanes) as pool:
        done = list(pool.map(lambda j: _announce(run_job(j, out)), jobs))
    with ThreadPoolExecutor(args.lanes) as pool:
        tests = list(pool.map(
            lambda j: None if j["winner"] is None else bench_quality.retrain(j["winner"]), done
        ))  # fmt: skip
    for job, test in zip(done, tests, strict=True):
        job["test"] = test
    (out / "results.json").write_text(json.dumps(done, indent=1, default=str))
    _print(done, starts, args.seeds, args.budget)


def _announce(job: dict[str, Any]) -> dict[str, Any]:
    n = sum(1 for t in job["trials"] if t["state"] in ("COMPLETE", "PRUNED"))
    print(f"  {job['name']}: {n} trials in {job['wall']:.0f}s; {job['ended']}", flush=True)
    return job


def _print(done: Sequence[Mapping[str, Any]], starts: Sequence[str], seeds: Sequence[int],
           budget: float) -> None:  # fmt: skip
    def pick(start: str, side: str, key: str) -> list[Any]:
        rows = {j["seed"]: j for j in done if j["start"] == start and j["side"] == side}
        return [rows[s].get(key) if s in rows else None for s in seeds]

    def mean(values: Sequence[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return sum(known) / len(known) if known and len(known) == len(values) else None

    print(f"\n{done[0]['data']}, {budget:.0f}s, seeds {list(seeds)}: test accuracy (%) of the"
          " retrained winner; time to 98% test; share of the budget used")  # fmt: skip
    head = f"{'start':<10} {'staged':>7} {'joint':>7} {'ratio':>7}   per seed (staged / joint)"
    print(head + "      to 98% (staged / joint)    used (staged / joint)")
    for start in starts:
        s_test, j_test = pick(start, "staged", "test"), pick(start, "joint", "test")
        ms, mj = mean(s_test), mean(j_test)
        ratio = f"{ms / mj:.4f}" if ms and mj else "-"
        per = " ".join(f"{_pct(a)}/{_pct(b)}" for a, b in zip(s_test, j_test, strict=True))
        pairs = zip(pick(start, "staged", "reach"), pick(start, "joint", "reach"), strict=True)
        reach = " ".join(f"{_secs(a)}/{_secs(b)}" for a, b in pairs)
        pairs = zip(pick(start, "staged", "used"), pick(start, "joint", "used"), strict=True)
        used = " ".join(f"{_share(a)}/{_share(b)}" for a, b in pairs)
        print(f"{start:<10} {_pct(ms):>7} {_pct(mj):>7} {ratio:>7}   {per}   {reach}   {used}")
    if any(j["side"] == "joint_smooth" for j in done):
        print("joint_smooth (the joint search scoring trials as tuner does), per start:")
        for start in starts:
            tests = pick(start, "joint_smooth", "test")
            per = " ".join(_pct(t) for t in tests)
            print(f"{start:<10} {_pct(mean(tests)):>7}   ({per})")
    for job in done:
        if job["side"] == "staged":
            print(f"  {job['name']}: {job['ended']}")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _secs(value: float | None) -> str:
    return "never" if value is None else f"{value:.0f}s"


if __name__ == "__main__":
    main()
