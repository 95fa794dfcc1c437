"""Time to quality on MNIST-1D: the default staged study vs a hand-written joint Optuna search.

Both sides tune the same hyperparameters of the same model with the same training loop
(``objectives.loop.train``: 12 epochs at most, patience 4) on the same data, under the same
wall-clock budget, one torch thread each; only the search differs:

- staged: ``python -m tuner run timeout=B seed=S``, the default study as a user runs it
  (batch size, then lr, then optimizer, then architecture, each stage fixing the best values
  of the ones before; pre-flight checks included), one run per budget B;
- joint: the script a user writes from the Optuna docs: one study, ``TPESampler(seed=S)``,
  ``MedianPruner()``, every hyperparameter suggested in one define-by-run objective
  (``joint_objective`` below), the study's defaults enqueued as its first trial (the staged
  side's first trial is the same incumbent), ``study.optimize(timeout=600)``; its best trial
  at budget B is the best one finished by then (TPE does not know the budget, so one 600 s
  run serves all).

Each side's winner at each budget (the staged run's ``tuner export``, the joint study's best
trial finished within the budget) is retrained from its config and scored once on the test
split. Every trial also records its own model's test accuracy (``test_accuracy``; never used
to choose): from these, the time each side's incumbent (what it would export if stopped
then) first scores 98% test accuracy.

Jobs run in parallel lanes (default 2, one per core), longest first. Run:

    python tests/benchmarks/bench_quality.py                      # about 50 min on 2 cores
    python tests/benchmarks/bench_quality.py --budgets 30 --seeds 0 --joint-budget 30  # smoke

Prints test accuracy per budget for each side (mean and per seed), the time to 98%, and the
ratios staged/joint; writes everything to ``--out`` (results.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

TARGET = 0.98  # the test accuracy whose time to reach is measured
TAKE_STAGES = ("batch_size", "lr", "optimizer", "architecture", "refine")


# --- the objective both sides train: the default one, also scoring the test split ------------


def train(
    config: Mapping[str, Any], report: Callable[[int, dict[str, float]], None] | None = None
) -> dict[str, Any]:
    """``objectives:train`` that also records its own model's test accuracy (for the time to
    98%; the search never sees it). tuner runs it as ``objective=bench_quality:train``."""
    from objectives.loop import train as train_loop

    result = train_loop(config, report, test=True)
    test = result.pop("test", None)
    if test is not None:
        result["test_accuracy"] = float(test["accuracy"])
    return result


def validate(config: Mapping[str, Any]) -> None:
    from objectives.loop import validate as validate_loop

    validate_loop(config)


def probe(config: Mapping[str, Any]) -> Any:
    """The default objective's probe: the staged run's pre-flight checks run as a user's do."""
    from objectives.probe import probe as probe_loop

    return probe_loop(config)


# --- the hand-written joint search, as the Optuna docs teach ----------------------------------


def joint_objective(trial: Any, base: Mapping[str, Any]) -> float:
    """Every hyperparameter of the staged study's four stages, in one search space."""
    import optuna

    config = copy.deepcopy(dict(base))
    config["batch_size"] = trial.suggest_categorical("batch_size", [32, 64, 128, 256])  # staged's
    config["lr"] = trial.suggest_float("lr", 3e-4, 3e-1, log=True)  # Adam's to SGD's
    config["schedule"] = trial.suggest_categorical("schedule", ["constant", "cosine", "onecycle"])
    config["warmup"] = trial.suggest_float("warmup", 0.0, 0.4)
    optimizer = trial.suggest_categorical("optimizer", ["sgd", "adam", "adamw", "rmsprop"])
    config["optimizer"] = optimizer
    if optimizer in ("sgd", "rmsprop"):
        config["momentum"] = trial.suggest_float("momentum", 0.8, 0.99)
    else:
        config["beta1"] = trial.suggest_float("beta1", 0.8, 0.95)
        config["beta2"] = trial.suggest_categorical("beta2", [0.98, 0.99, 0.999])
    config["weight_decay"] = trial.suggest_float("weight_decay", 1e-5, 1e-1, log=True)
    model = dict(config["model"])
    model["width"] = trial.suggest_categorical("width", [16, 24, 32, 48, 64])
    model["depth"] = trial.suggest_int("depth", 2, 6)
    model["kernel_size"] = trial.suggest_categorical("kernel_size", [3, 5, 7])
    model["dropout"] = trial.suggest_float("dropout", 0.0, 0.3)
    model["norm"] = trial.suggest_categorical("norm", ["batch", "group", "layer", "none"])
    model["activation"] = trial.suggest_categorical("activation", ["relu", "leaky_relu", "gelu"])
    model["init"] = trial.suggest_categorical("init", ["he", "xavier"])
    config["model"] = model
    trial.set_user_attr("config", config)

    def report(epoch: int, metrics: Mapping[str, float]) -> None:
        trial.report(metrics["accuracy"], epoch)
        if trial.should_prune():
            raise optuna.TrialPruned()

    result = train(config, report)
    if "accuracy" not in result:  # diverged in its first epoch
        raise optuna.TrialPruned()
    trial.set_user_attr("test_accuracy", result["test_accuracy"])
    return float(result["accuracy"])


def run_joint(seed: int, budget: float, storage: str) -> None:
    """The joint search of one seed, as its own process (``--joint``)."""
    import optuna
    import torch

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = dict(_defaults(), seed=seed)
    study = optuna.create_study(
        storage=storage,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(),
    )
    study.enqueue_trial(enqueued_defaults(base))  # the same first trial as the staged side's
    study.optimize(lambda t: joint_objective(t, base), timeout=budget)


def enqueued_defaults(base: Mapping[str, Any]) -> dict[str, Any]:
    """The study's defaults as the joint search's first trial: the staged side starts from
    them too (its first trial is the incumbent), so both begin at the same point."""
    model = base["model"]
    params = {key: base[key] for key in ("batch_size", "lr", "schedule", "warmup", "optimizer",
                                         "weight_decay")}  # fmt: skip
    if base["optimizer"] in ("sgd", "rmsprop"):
        params["momentum"] = base["momentum"]
    else:
        params.update(beta1=base["beta1"], beta2=base["beta2"])
    params.update({key: model[key] for key in ("width", "depth", "kernel_size", "dropout",
                                               "norm", "activation", "init")})  # fmt: skip
    return params


def _defaults() -> dict[str, Any]:
    from tuner.config import load_study

    return dict(load_study().defaults)


# --- jobs --------------------------------------------------------------------------------------


def run_job(job: dict[str, Any], out: Path) -> dict[str, Any]:
    """Run one tuning job in its own process; return its trials, timed from its launch."""
    folder = out / job["name"]
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "study.db"
    url = f"sqlite:///{db}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)])}
    if job["side"] == "staged":
        command = [sys.executable, "-m", "tuner", "run", f"timeout={job['budget']}",
                   f"seed={job['seed']}", f"storage={url}",
                   "objective=bench_quality:train"]  # fmt: skip
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--joint",
                   f"--seed={job['seed']}", f"--budget={job['budget']}",
                   f"--storage={url}"]  # fmt: skip
    started = time.time()
    with open(folder / "log.txt", "w") as log:
        code = subprocess.call(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - started
    if code != 0:
        raise RuntimeError(f"{job['name']} exited {code}: see {folder / 'log.txt'}")
    return {**job, "wall": wall, "trials": _trials(url, started)}


def _trials(url: str, started: float) -> list[dict[str, Any]]:
    """Every finished trial of every study in the storage: stage, end time, values, config."""
    import optuna

    trials = []
    for summary in optuna.get_all_study_summaries(url):
        study = optuna.load_study(study_name=summary.study_name, storage=url)
        stage = study.user_attrs.get("stage", "joint")
        for t in study.get_trials(deepcopy=False):
            if t.datetime_complete is None:
                continue
            trials.append(
                {
                    "stage": stage,
                    "number": t.number,
                    "state": t.state.name,
                    "end": t.datetime_complete.timestamp() - started,
                    "value": t.value,
                    "test_accuracy": t.user_attrs.get("test_accuracy"),
                    "config": t.user_attrs.get("config"),
                }
            )
    return sorted(trials, key=lambda t: t["end"])


def incumbent(
    trials: Sequence[Mapping[str, Any]], side: str, at: float
) -> Mapping[str, Any] | None:
    """What a side would export if stopped at ``at`` seconds: the joint study's best finished
    trial; for staged, as ``tuner export``, the best trial of the last stage with one."""
    done = [t for t in trials if t["end"] <= at and t["state"] == "COMPLETE" and t["config"]]
    done = [t for t in done if t["value"] is not None and math.isfinite(t["value"])]
    if side == "staged":
        for stage in reversed(TAKE_STAGES):
            in_stage = [t for t in done if t["stage"] == stage]
            if in_stage:
                done = in_stage
                break
    if not done:
        return None
    return max(done, key=lambda t: (t["value"], -t["number"]))  # ties: the earlier trial


def time_to(trials: Sequence[Mapping[str, Any]], side: str, target: float) -> float | None:
    """The first time the incumbent's own test accuracy reaches ``target`` (None: never)."""
    for t in trials:
        best = incumbent(trials, side, t["end"])
        if best is not None and (best["test_accuracy"] or 0.0) >= target:
            return float(t["end"])
    return None


def retrain(config: Mapping[str, Any]) -> float:
    """Train a winner's config again and score the test split once (one torch thread)."""
    return retrained(config)["test"]


def retrained(config: Mapping[str, Any]) -> dict[str, float]:
    """Train a config again to its own end, in a process of its own with one torch thread:
    its best epoch's validation ``accuracy``, the ``test`` accuracy and the ``best_epoch``."""
    code = (
        "import json, sys, torch; torch.set_num_threads(1);"
        "from objectives.loop import train;"
        "r = train(json.loads(sys.stdin.read()), test=True);"
        "print(json.dumps({'accuracy': r['accuracy'], 'test': r['test']['accuracy'],"
        " 'best_epoch': r['best_epoch']}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(config), capture_output=True,
        text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    return {k: float(v) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


# --- the table ---------------------------------------------------------------------------------


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if len(known) == len(values) and known else None


def _pct(value: float | None) -> str:
    return "   -  " if value is None else f"{100 * value:6.2f}"


def _secs(value: float | None, limit: float) -> str:
    return f">{limit:.0f}s" if value is None else f"{value:.0f}s"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[100, 300, 600])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--joint-budget", type=float, default=None, help="default: max budget")
    parser.add_argument("--sides", nargs="+", default=["staged", "joint"], help="which to run")
    parser.add_argument("--lanes", type=int, default=2, help="jobs at a time (one per core)")
    parser.add_argument("--out", default=None, help="folder for the studies and results.json")
    parser.add_argument("--joint", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--storage", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.joint:
        run_joint(args.seed, args.budget, args.storage)
        return

    out = Path(args.out or tempfile.mkdtemp(prefix="bench_quality_"))
    out.mkdir(parents=True, exist_ok=True)
    budgets = sorted(args.budgets)
    joint_budget = args.joint_budget or budgets[-1]
    from objectives.data import load as load_data  # generate MNIST-1D before any clock starts

    load_data(_defaults()["data"], 0, __import__("torch").device("cpu"))
    jobs = [{"side": "staged", "seed": s, "budget": b} for s in args.seeds for b in budgets]
    jobs += [{"side": "joint", "seed": s, "budget": joint_budget} for s in args.seeds]
    jobs = [job for job in jobs if job["side"] in args.sides]
    for job in jobs:
        job["name"] = f"{job['side']}_s{job['seed']}_b{job['budget']:g}"
    jobs.sort(key=lambda j: -j["budget"])
    print(f"{len(jobs)} jobs in {args.lanes} lanes; studies and logs in {out}", flush=True)
    with ThreadPoolExecutor(args.lanes) as pool:
        done = list(pool.map(lambda j: _announce(run_job(j, out)), jobs))

    # The winners at each budget, retrained and scored once on the test split.
    winners: list[tuple[str, int, float, Mapping[str, Any] | None]] = []
    for job in done:
        side, seed = job["side"], job["seed"]
        at = [job["budget"]] if side == "staged" else budgets
        for budget in at:
            winners.append((side, seed, budget, incumbent(job["trials"], side, budget)))
    with ThreadPoolExecutor(args.lanes) as pool:
        tests = list(
            pool.map(lambda w: None if w[3] is None else retrain(w[3]["config"]), winners)
        )
    results: dict[str, Any] = {"budgets": budgets, "seeds": args.seeds, "jobs": done, "test": []}
    for (side, seed, budget, best), test in zip(winners, tests, strict=True):
        recorded = None if best is None else best["test_accuracy"]
        results["test"].append({"side": side, "seed": seed, "budget": budget,
                                "test_accuracy": test, "recorded": recorded})  # fmt: skip
    longest = {(j["side"], j["seed"]): j for j in done if j["budget"] == max(
        x["budget"] for x in done if x["side"] == j["side"])}  # fmt: skip
    reach = {key: time_to(job["trials"], key[0], TARGET) for key, job in longest.items()}
    results["time_to_target"] = {f"{k[0]}_s{k[1]}": v for k, v in reach.items()}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    _print(results, budgets, args.seeds, reach, joint_budget)


def _announce(job: dict[str, Any]) -> dict[str, Any]:
    n = sum(1 for t in job["trials"] if t["state"] in ("COMPLETE", "PRUNED"))
    print(f"  {job['name']}: {n} trials in {job['wall']:.0f}s", flush=True)
    return job


def _print(
    results: Mapping[str, Any],
    budgets: Sequence[float],
    seeds: Sequence[int],
    reach: Mapping[tuple[str, int], float | None],
    joint_budget: float,
) -> None:
    def test(side: str, seed: int, budget: float) -> float | None:
        for row in results["test"]:
            if (row["side"], row["seed"], row["budget"]) == (side, seed, budget):
                return row["test_accuracy"]  # type: ignore[no-any-return]
        return None

    print(f"\ntest accuracy (%) of each side's winner, retrained; seeds {list(seeds)}")
    print(f"{'budget':>8}  {'staged (mean; per seed)':<32} {'joint (mean; per seed)':<32} ratio")
    for budget in budgets:
        cells, means = [], []
        for side in ("staged", "joint"):
            values = [test(side, s, budget) for s in seeds]
            mean = _mean(values)
            means.append(mean)
            cells.append(f"{_pct(mean)}; " + " ".join(_pct(v).strip() for v in values))
        ratio = f"{means[0] / means[1]:.4f}" if means[0] and means[1] else "-"
        print(f"{budget:>7.0f}s  {cells[0]:<32} {cells[1]:<32} {ratio}")
    print(f"\ntime until the incumbent scores {100 * TARGET:.0f}% test accuracy")
    for side in ("staged", "joint"):
        limit = max(budgets) if side == "staged" else joint_budget
        times = [reach.get((side, s)) for s in seeds]
        mean = _mean(times)
        per = " ".join(_secs(t, limit) for t in times)
        print(f"  {side:<7} mean {_secs(mean, limit):>6}   per seed: {per}")
    staged, joint = (_mean([reach.get((side, s)) for s in seeds]) for side in ("staged", "joint"))
    if staged and joint:
        print(f"  ratio joint/staged: {joint / staged:.1f}x (staged is faster above 1)")
    elif staged:
        print(
            f"  joint did not reach {100 * TARGET:.0f}% on every seed within {joint_budget:.0f}s"
        )


if __name__ == "__main__":
    main()
