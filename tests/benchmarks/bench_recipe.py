"""What a config's test accuracy depends on, and how far one seed moves it: a study's recipe
(its ``defaults:``) retrained on several seeds, and the recipe with one value changed.

A search that chooses on a 400-sample validation split cannot see a difference of 0.3 points
in one trial (about one validation sample); this measures such differences where they can be
seen: each variant on the same seeds, side by side, its mean and spread, and its ratio to the
recipe's mean in the same run. The default study's recipe is the level the plain-start
benchmark (``bench_plain_starts.py``) holds the staged search to.

Run (about 5 min on 2 cores with the defaults):

    python tests/benchmarks/bench_recipe.py                         # the default study
    python tests/benchmarks/bench_recipe.py --seeds 0 1 --variants label_smoothing=0
    python tests/benchmarks/bench_recipe.py --set epochs=24 patience=8 --variants none

Each variant is ``key=value`` (dotted keys for nested ones, as ``python -m tuner run``
overrides take them), or several joined by commas; ``--set`` changes the recipe itself.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

# One value each, away from the default study's recipe (what its comments say matters).
VARIANTS = (
    "label_smoothing=0", "model.norm=none", "model.kernel_size=3", "model.activation=relu",
    "schedule=cosine", "weight_decay=1e-4", "model.width=64", "optimizer=adam,weight_decay=1e-4",
)  # fmt: skip


def parse(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs, the values read as on the command line (numbers, booleans, ...)."""
    from tuner import yamlio
    from tuner.coerce import parse_pairs
    from tuner.errors import UserError

    try:
        return {key: yamlio.parse_value(value) for key, value in parse_pairs(pairs).items()}
    except UserError as exc:
        raise SystemExit(f"bench_recipe: {exc}") from None


def config_of(recipe: Mapping[str, Any], changes: Mapping[str, Any], seed: int) -> dict[str, Any]:
    from tuner.nested import set_path

    config = copy.deepcopy(dict(recipe))
    for key, value in changes.items():
        set_path(config, key, value)
    config["seed"] = seed
    return config


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="mnist1d_cnn", help="a bundled study or a file")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(6)))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS),
                        help="key=value each; 'none': the recipe alone")  # fmt: skip
    parser.add_argument("--set", nargs="*", default=[], help="key=value: change the recipe")
    parser.add_argument("--lanes", type=int, default=2)
    args = parser.parse_args(argv)
    import bench_quality

    from tuner.config import load_study

    recipe = config_of(load_study(args.study).config, parse(args.set), 0)
    variants: dict[str, dict[str, Any]] = {"recipe": {}}
    for pair in [v for v in args.variants if v != "none"]:
        variants[pair] = parse(pair.split(","))
    jobs = [(name, seed) for name in variants for seed in args.seeds]
    with ThreadPoolExecutor(args.lanes) as pool:  # one torch thread per retrain, one per core
        tests = list(pool.map(
            lambda job: bench_quality.retrain(config_of(recipe, variants[job[0]], job[1])), jobs
        ))  # fmt: skip
    by: dict[str, list[float]] = {name: [] for name in variants}
    for (name, _), test in zip(jobs, tests, strict=True):
        by[name].append(100 * test)
    base = statistics.fmean(by["recipe"])
    changed = ", ".join(args.set) or "none"
    print(f"\n{args.study}: test accuracy (%) on seeds {args.seeds}; recipe changes: {changed}")
    print(f"{'variant':<34} {'mean':>6} {'std':>5} {'ratio':>6}   per seed")
    for name, values in by.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        per = " ".join(f"{v:.1f}" for v in values)
        mean = statistics.fmean(values)
        print(f"{name:<34} {mean:6.2f} {std:5.2f} {mean / base:6.4f}   {per}")


if __name__ == "__main__":
    main()
