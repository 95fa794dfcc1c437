"""``tuner dashboard``: a real optuna-dashboard process on a tiny study's storage, read
through its HTTP API and in headless Chromium; and the mistakes a user can make."""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

import pytest
import torch

from tests.browser import colours, render
from tests.tiny_study import STAGES, Tiny, expect_user_error, run_tiny
from tuner import artifacts
from tuner.cli import main


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read()
    return json.loads(body) if response.headers.get_content_type() == "application/json" else body


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    tiny = run_tiny(tmp_path_factory.mktemp("dashboard"))
    # A new best trial of stage lr, with its weights, as the runner saves them.
    study = tiny.stage("lr")
    trial = study.ask()
    assert artifacts.becomes_best(study, 0.99)
    artifacts.save_weights(study, trial, torch.nn.Linear(3, 2), tiny.url)
    study.tell(trial, 0.99)
    return tiny


@pytest.fixture(scope="module")
def server(tiny: Tiny) -> Iterator[str]:
    """The dashboard as a user starts it; stopped with Ctrl-C (SIGINT) at the end."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tuner", "dashboard", *tiny.args, f"port={port}"],
        cwd=tiny.folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None, process.communicate()
        try:
            get(f"{base}/api/meta")
            break
        except OSError:
            assert time.monotonic() < deadline, "the dashboard did not answer in 30 s"
            time.sleep(0.2)
    yield base
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=10)
    # Ctrl-C ends it quietly: exit 0, no traceback; it said where to look.
    assert process.returncode == 0 and err == "", err
    assert f"http://127.0.0.1:{port}/dashboard" in out


def studies(base: str) -> dict[str, dict[str, Any]]:
    return {s["study_name"]: s for s in get(f"{base}/api/studies")["study_summaries"]}


def test_the_four_stage_studies_are_served(server: str) -> None:
    found = studies(server)
    assert set(found) == {f"tiny/{stage}" for stage in STAGES}
    attrs = {a["key"]: a["value"] for a in found["tiny/lr"]["user_attrs"]}
    assert attrs["stage"] == "lr" and json.loads(attrs["searches"]) == ["lr", "schedule", "warmup"]


def test_each_stage_has_its_note_and_its_trials_user_attrs(server: str) -> None:
    for name, summary in studies(server).items():
        detail = get(f"{server}/api/studies/{summary['study_id']}")
        note = detail["note"]["body"]
        # The note says what the stage searched, what it fixed, and its best so far.
        for heading in ("## Searched", "## Fixed", "## Best so far", "## Diagnostics"):
            assert heading in note, (name, note)
        complete = [t for t in detail["trials"] if t["state"] == "Complete"]
        assert complete, name
        keys = {a["key"] for a in complete[0]["user_attrs"]}
        assert {"config", "accuracy", "stop_reason", "trial_seconds"} <= keys, (name, keys)
    lr = get(f"{server}/api/studies/{studies(server)['tiny/lr']['study_id']}")
    assert "`batch_size`" in lr["note"]["body"]  # fixed by the stage before, with its source
    assert "- a diagnostic line" in lr["note"]["body"]
    assert lr["objective_names"] == ["accuracy"]  # the axes say what the value is


def test_the_best_trials_weights_download(server: str) -> None:
    lr = get(f"{server}/api/studies/{studies(server)['tiny/lr']['study_id']}")
    assert get(f"{server}/api/meta")["artifact_is_available"]
    with_files = [t for t in lr["trials"] if t["artifacts"]]
    assert len(with_files) == 1
    trial, meta = with_files[0], with_files[0]["artifacts"][0]
    assert meta["filename"] == f"tiny-lr-trial{trial['number']}-weights.pt"
    body = get(f"{server}/artifacts/{trial['study_id']}/{trial['trial_id']}/{meta['artifact_id']}")
    state = torch.load(io.BytesIO(body), weights_only=True)
    assert set(state) == {"weight", "bias"}


def test_the_dashboard_renders_in_chromium(server: str, tmp_path: Path) -> None:
    png = tmp_path / "dashboard.png"
    dom = render(f"{server}/dashboard", png)
    for stage in STAGES:
        assert f"tiny/{stage}" in dom  # the study list, drawn by the page's scripts
    assert colours(png) > 10  # not a blank page


# --- mistakes, in-process ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["storage=sqlite:///missing.db"], "No storage at sqlite:///missing.db"),
        (["port=70000"], "port=70000: a port is a number from 1 to 65535"),
        (["port=web"], "port=web: port must be an integer"),
        (["host=10.255.255.1", "port=0"], "Cannot listen on 10.255.255.1:0"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(
    tiny: Tiny, args: list[str], message: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.chdir(tiny.folder)
    expect_user_error("dashboard", tiny, args, message, capsys)


def test_a_port_in_use_is_one_line(tiny: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["dashboard", *tiny.args, f"port={port}"]) == 2
    assert "Address already in use (try another port=)" in capsys.readouterr().err


def test_another_host_warns_that_there_is_no_authentication(
    tiny: Tiny, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def ctrl_c(self: WSGIServer, poll_interval: float = 0.5) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(WSGIServer, "serve_forever", ctrl_c)
    assert main(["dashboard", *tiny.args, "host=0.0.0.0", "port=0"]) == 0  # Ctrl-C: status 0
    captured = capsys.readouterr()
    assert "no authentication" in captured.err
    assert "http://0.0.0.0:" in captured.out and "/dashboard" in captured.out


def test_passwords_never_show(capsys: pytest.CaptureFixture[str]) -> None:
    # Nothing listens on port 1: the storage cannot be opened, and the error says so masked.
    assert main(["dashboard", "storage=postgresql://tuner:s3cret@127.0.0.1:1/none"]) == 2
    err = capsys.readouterr().err
    assert "s3cret" not in err and "tuner:***@" in err, err
