"""``tuner report``: one offline HTML file (staircase, per-stage plots, config, diagnostics)
or one CSV table of every trial; it degrades to sentences where a plot cannot be drawn."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from tests import fake_study
from tests.browser import colours, render
from tests.tiny_study import STAGES, Tiny, expect_user_error, run_tiny
from tuner import _report as report
from tuner.cli import main
from tuner.config import apply_overrides, load_study
from tuner.nested import merged


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return run_tiny(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def page(tiny: Tiny) -> Path:
    out = tiny.folder / "report.html"
    assert main(["report", *tiny.args, f"out={out}"]) == 0
    return out


def test_the_page_has_the_staircase_each_stages_plots_and_the_config(page: Path) -> None:
    text = page.read_text()
    assert 'id="staircase-plot"' in text
    for stage in STAGES:
        assert f'id="stage-{stage}"' in text
        assert f'id="history-{stage}"' in text and f'id="curves-{stage}"' in text
    assert text.count('id="importances-') >= 3  # lr, optimizer, architecture vary params
    assert "# Best config of study tiny" in text and "provenance:" in text  # the export YAML
    assert "a diagnostic line" in text  # from the lr stage's note


def test_the_page_opens_offline(page: Path) -> None:
    text = page.read_text()
    # No script, style sheet or frame is fetched: plotly.js is inlined, once.
    assert not re.search(r"<(script|link|iframe|img)\b[^>]*\b(src|href)=", text, re.I)
    assert "cdn.plot.ly" not in re.sub(r"<script>.*?</script>", "", text, flags=re.S)
    assert len(re.findall(r"<script>/\*\*?\s*\n?\s*\* plotly\.js v", text)) == 1


def test_the_staircase_never_goes_down(tiny: Tiny) -> None:
    study = apply_overrides(load_study(str(tiny.study_file)), {"storage": tiny.url}, {}).study
    steps = report.staircase(report.load(study))
    assert [s.stage for s in steps] == ["defaults", *STAGES]
    # Each stage starts from the best config so far (its first trial), so no gain is < 0.
    assert all(s.gain is not None and s.gain >= 0 for s in steps[1:])
    assert steps[-1].value == pytest.approx(max(s.value for s in steps))


def test_csv_has_one_row_per_trial(tiny: Tiny) -> None:
    out = tiny.folder / "trials.csv"
    assert main(["report", *tiny.args, f"out={out}"]) == 0  # .csv: format=csv
    table = pd.read_csv(out)
    trials = sum(len(tiny.stage(stage).trials) for stage in STAGES)
    assert len(table) == trials
    assert list(table.columns[:5]) == ["stage", "number", "state", "value", "seconds"]
    assert {"params_lr", "params_batch_size", "accuracy", "stop_reason"} <= set(table.columns)
    assert set(table["stage"]) == set(STAGES)


def test_csv_says_where_each_trial_trained_and_its_sampler_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_study.write(tmp_path, trials=3, epochs=1, sleep=0.0)
    monkeypatch.chdir(tmp_path)
    assert main(["run", "study=fake.yaml", "devices=cpu", "check=false"]) == 0
    assert main(["report", "study=fake.yaml", "format=csv", "out=trials.csv"]) == 0
    table = pd.read_csv(tmp_path / "trials.csv")
    assert len(table) == 3
    assert list(table["device"]) == ["cpu"] * 3  # as each trial recorded it
    stored = optuna.load_study(study_name="fake/lr", storage=f"sqlite:///{tmp_path}/tuner.db")
    assert list(table["sampler_seed"]) == [t.user_attrs["sampler_seed"] for t in stored.trials]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["format=pdf"], "format=pdf: the formats are html and csv"),
        (["out=/no/dir/r.html"], "out=/no/dir/r.html: folder /no/dir does not exist"),
        (["storage=sqlite:///missing.db"], "No storage at sqlite:///missing.db"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(
    tiny: Tiny, args: list[str], message: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.chdir(tiny.folder)
    expect_user_error("report", tiny, args, message, capsys)


def test_a_storage_without_the_study_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/other.db"
    optuna.create_study(study_name="something/else", storage=url)
    assert main(["report", "study=digits_mlp", f"storage={url}"]) == 2
    assert "Nothing to report: study digits_mlp has no stage" in capsys.readouterr().err


def test_plots_that_cannot_be_drawn_become_sentences(tmp_path: Path) -> None:
    """Stages with one trial, no complete trial, and no varied parameter: no crash."""
    url = f"sqlite:///{tmp_path}/odd.db"
    study = apply_overrides(load_study("digits_mlp"), {"storage": url}, {}).study
    lr = FloatDistribution(1e-4, 1e-1, log=True)

    def stage(name: str, *trials: optuna.trial.FrozenTrial) -> None:
        s = optuna.create_study(
            study_name=study.stage_name(name), storage=url, direction="maximize"
        )
        s.set_user_attr("metric", "accuracy")
        s.add_trials(trials)

    def trial(
        value: float | None, lr_value: float, state: TrialState = TrialState.COMPLETE
    ) -> optuna.trial.FrozenTrial:
        return create_trial(
            state=state, value=value, params={"lr": lr_value}, distributions={"lr": lr},
            user_attrs={"config": merged(study.config, {"lr": lr_value})}, intermediate_values={},
        )  # fmt: skip

    stage("batch_size", trial(0.5, 1e-3))  # one trial
    stage("lr", trial(None, 1e-3, TrialState.PRUNED), trial(None, 1e-2, TrialState.FAIL))
    stage("optimizer", trial(0.6, 1e-3), trial(0.7, 1e-3))  # the same params twice
    text = report.page(study, report.load(study))
    assert "this stage has 1 complete trial(s)" in text
    assert "this stage has 2 complete trial(s), all with the same parameters" in text
    assert "No complete trial yet." in text  # lr's history
    assert "No complete trial reported per-epoch values." in text
    assert text.count("Not run yet.") == 2  # architecture, refine


def test_the_page_renders_in_chromium(page: Path, tmp_path: Path) -> None:
    png = tmp_path / "report.png"
    dom = render(page.as_uri(), png, height=1400)
    # plotly drew every figure: each div became a js-plotly-plot with an SVG inside.
    drawn = len(re.findall(r'class="[^"]*js-plotly-plot', dom))
    assert drawn >= 1 + 2 * len(STAGES), drawn
    assert "What each stage bought" in dom
    assert colours(png) > 10
