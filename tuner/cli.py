"""The command line: ``python -m tuner COMMAND [key=value ...]``.

Data flows one way: the arguments make a study config, the config makes a stage plan, the
runner runs it through Optuna into the storage, and status/export read it back. A user's
mistake ends in one line on stderr and exit status 2; nothing is written before the plan
holds.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence

from tuner import __version__, signals, yamlio
from tuner import storage as storages
from tuner.coerce import parse_pairs
from tuner.config import DEFAULT_STUDY, Overrides, apply_overrides, load_study
from tuner.errors import CheckFailed, StageFailed, UserError
from tuner.text import printable

USAGE = f"""\
tuner {__version__}: staged hyperparameter tuning of PyTorch models on Optuna

usage: python -m tuner COMMAND [key=value ...]

commands:
  run       tune: the study's stages in order (batch_size, lr, optimizer, architecture,
            refine), or stage=NAME
  status    a table of the stages: trials, best value and params, fixed values and their source
  export    write the best config, complete and with its provenance, as YAML (out=best.yaml)
  train     train an exported config and score the test split once (config=best.yaml)
  dashboard optuna-dashboard on the study's storage, with the best trials' weights (127.0.0.1)
  report    one self-contained HTML file (out=report.html) of the results, or format=csv
  check     pre-flight checks of the model and data (seeds/003); run does them first

keys (any command): study=NAME|FILE (default {DEFAULT_STUDY}), storage=URL
run:    stage=NAME trials=N timeout=SECONDS restart=true workers=N threads=N heartbeat=SECONDS,
        check=false (skip the pre-flight checks), deterministic=true (no time race: a sample
        budget), devices=0,1 (a GPU per worker; default: every visible one), start=FILE|STUDY
        (warm start from an exported config or another study's best), and any config key
        of the study (lr=1e-3, batch_size=64, model.width=64, epochs=20, seed=1, ...)
export: out=FILE stage=NAME
train:  config=FILE out=FOLDER threads=N repeats=N (seeds seed..seed+N-1: mean ± std),
        and any config key of the exported config
check:  threads=N, and any config key of the study
dashboard: port=8080 host=127.0.0.1 artifacts=FOLDER (default: tuner_artifacts/ by the db)
report: out=FILE format=html|csv

examples:
  python -m tuner run
  python -m tuner run stage=lr trials=20
  python -m tuner status
  python -m tuner export out=best.yaml
  python -m tuner train config=best.yaml
  python -m tuner dashboard
  python -m tuner report out=report.html
"""

BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a tool whose reader left
DEFAULT_THREADS = 1  # torch threads per process: several workers share 2 cores, and
# tuning and `train` must run alike for the tuned validation value to come back exactly
OPTIONS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "run": {
        "stage": str,
        "trials": int,
        "timeout": (float, int),
        "restart": bool,
        "workers": int,
        "threads": int,
        "heartbeat": (float, int),
        "check": bool,
        "deterministic": bool,
        "devices": str,
        "start": str,
    },
    "check": {"threads": int},
    "status": {},
    "export": {"out": str, "stage": str},
    "dashboard": {"port": int, "host": str, "artifacts": str},
    "report": {"out": str, "format": str},
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        print(f"tuner {__version__}")
        return 0
    _quiet_libraries()
    with signals.installed():  # SIGTERM as Ctrl-C (tuner.signals); as they were on return
        return _command(args[0], args[1:])


def _command(command: str, rest: list[str]) -> int:
    """Run one command; its errors as one line and an exit status."""
    handlers: dict[str, Callable[[list[str]], int]] = {
        "run": _run, "status": _status, "export": _export, "train": _train,
        "dashboard": _dashboard, "report": _report, "check": _check,
    }  # fmt: skip
    try:
        if command not in handlers:
            raise UserError(f"Unknown command '{command}'; commands: {', '.join(handlers)}.")
        code = handlers[command](rest)
        sys.stdout.flush()  # a closed pipe shows here, not at exit as a traceback
        return code
    except BrokenPipeError:
        # The reader left (`status | head -1`): stop quietly, as a killed-by-SIGPIPE tool
        # does. Later writes, the interpreter's last flush among them, go to /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return BROKEN_PIPE
    except (UserError, StageFailed, CheckFailed) as exc:
        print(f"tuner: {_one_line(storages.mask(str(exc)))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        signals.exit_on_next_interrupt()  # a second one while this is said ends it at once
        print(
            "tuner: interrupted; finished trials are kept, run again to resume.", file=sys.stderr
        )
        return 130


def _resolve(command: str, rest: list[str]) -> Overrides:
    pairs = parse_pairs(rest)
    name = pairs.pop("study", DEFAULT_STUDY)
    study = load_study(name)
    return apply_overrides(study, pairs, {**OPTIONS[command]})


def _run(rest: list[str]) -> int:
    import tuner
    from tuner import _status as status

    resolved = _resolve("run", rest)
    opts, study = resolved.options, resolved.study
    result = tuner.run(
        study,
        stage=opts.get("stage"),
        trials=opts.get("trials"),
        timeout=opts.get("timeout"),
        restart=bool(opts.get("restart", False)),
        workers=opts.get("workers"),
        threads=opts.get("threads", DEFAULT_THREADS),  # set after the worker processes start
        heartbeat=opts.get("heartbeat"),
        check=bool(opts.get("check", True)),
        deterministic=opts.get("deterministic"),
        devices=opts.get("devices"),
        start=opts.get("start"),
        progress=_print,
    )
    study = result.study
    print()
    print(f"run ended after {result.seconds:.0f} s: {result.ended}.")
    print(status.render(study, result.stages))
    print()
    print("next:")
    study_arg = "" if study.name == DEFAULT_STUDY else f" study={study.arg}"
    print(f"  python -m tuner export{study_arg} out=best.yaml   # the best config as YAML")
    print("  python -m tuner train config=best.yaml   # train it, score the test split once")
    print(f"  python -m tuner dashboard{study_arg}   # optuna-dashboard on this storage")
    print(f"  python -m tuner report{study_arg}      # one HTML page: the stages and their plots")
    return 0


def _check(rest: list[str]) -> int:
    import tuner

    resolved = _resolve("check", rest)
    threads = resolved.options.get("threads", DEFAULT_THREADS)
    tuner.check(resolved.study, threads=threads, progress=_print)
    return 0


def _status(rest: list[str]) -> int:
    import tuner
    from tuner import _status as status

    study = _resolve("status", rest).study
    print(status.render(study, tuner.status(study)))
    return 0


def _export(rest: list[str]) -> int:
    import tuner

    resolved = _resolve("export", rest)
    stage = resolved.options.get("stage")
    path = tuner.export(resolved.study, str(resolved.options.get("out", "best.yaml")), stage)
    prov = tuner.best_config(resolved.study, stage)["provenance"]
    print(
        f"wrote {path}: stage {prov['stage']} trial #{prov['trial']},"
        f" validation {resolved.study.metric} {prov['value']:.4f}"
    )
    print(f"train it: python -m tuner train config={path}")
    return 0


def _dashboard(rest: list[str]) -> int:
    import tuner

    resolved = _resolve("dashboard", rest)
    opts = resolved.options
    tuner.dashboard(
        resolved.study,
        host=str(opts.get("host", "127.0.0.1")),
        port=int(opts.get("port", 8080)),
        artifacts=opts.get("artifacts"),
        progress=_print,
    )
    return 0


def _report(rest: list[str]) -> int:
    import tuner

    resolved = _resolve("report", rest)
    opts = resolved.options
    path = tuner.report(resolved.study, opts.get("out"), opts.get("format"))
    size = path.stat().st_size
    print(f"wrote {path} ({size / 1e6:.1f} MB)" if size > 1e5 else f"wrote {path} ({size} bytes)")
    return 0


def _train(rest: list[str]) -> int:
    import tuner

    pairs = parse_pairs(rest)
    config = pairs.pop("config", None)
    if config is None:
        raise UserError("train needs config=FILE, an exported config (python -m tuner export).")
    out = pairs.pop("out", "trained")
    threads = _int_option("threads", pairs.pop("threads", None))
    repeats = _int_option("repeats", pairs.pop("repeats", None))
    values = {key: yamlio.parse_value(text) for key, text in pairs.items()}
    tuner.train(
        config, out, repeats=1 if repeats is None else repeats,
        threads=DEFAULT_THREADS if threads is None else threads,
        progress=_print, **values,
    )  # fmt: skip
    return 0


def _one_line(message: str) -> str:
    """An error is one line, even when it quotes a value with a line break in it, and a
    value's control characters (ESC ...) are escaped."""
    return printable(message)


def _print(line: str) -> None:
    print(printable(line, keep_newlines=True), flush=True)  # workers write to this stream too


def _int_option(key: str, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{key}={text}: {key} must be an integer.") from None


def _quiet_libraries() -> None:
    """Optuna's own log lines and experimental warnings would drown ours."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    logging.getLogger("alembic").setLevel(logging.WARNING)
