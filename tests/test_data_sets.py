"""Data sets, models, losses and metrics users bring, run through the command line on tiny
data written in each set's real on-disk format (tests/fake_data.py).

Every run is in this process (a subprocess would import torch again) with the pre-flight
checks off (``check=false``: tests/test_checks.py covers them), tiny models and one epoch.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from optuna.trial import TrialState
from sklearn import metrics as skm
from torch import nn

import objectives
from objectives import _images, _tables, data, loop, losses, metrics, models
from tests import fake_data
from tuner import yamlio
from tuner.cli import main

ROOT = Path(__file__).resolve().parent.parent

README = Path(__file__).resolve().parents[1] / "README.md"
STUDIES = Path(__file__).resolve().parents[1] / "studies"
STAGES = ("batch_size", "lr", "optimizer", "architecture")


def tuner(folder: Path, *args: str) -> int:
    """``python -m tuner ARGS`` in ``folder``, in this process."""
    path = list(sys.path)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # where the study's files and a user's objective module are
        status = main(list(args))
    sys.path[:] = path
    return status


def tune(folder: Path, study: str, *overrides: str, trials: int = 4) -> dict[str, optuna.Study]:
    """Run all stages of ``study`` (one epoch a trial); return the stage studies."""
    url = f"sqlite:///{folder}/t.db"
    args = ["run", f"study={study}", f"storage={url}", f"trials={trials}", "epochs=1"]
    assert tuner(folder, *args, "check=false", *overrides) == 0
    name = Path(study).stem
    return {s: optuna.load_study(study_name=f"{name}/{s}", storage=url) for s in STAGES}


def assert_every_stage_completed(stages: dict[str, optuna.Study], metrics: set[str]) -> None:
    for stage, study in stages.items():
        complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
        assert complete, f"stage {stage} has no complete trial"
        # the best epoch's full metrics are stored with the trial
        assert metrics <= set(complete[0].user_attrs), set(complete[0].user_attrs)


def test_the_image_and_table_modules_load_only_for_their_own_sets() -> None:
    # The names dispatched without importing objectives._images are the ones it reads.
    assert set(data.TORCHVISION_SETS) == set(_images.TORCHVISION)
    code = (
        "import sys, objectives;"
        "from objectives.data import load;"
        "load({'name': 'digits', 'num_samples': 0, 'val_fraction': 0.2}, 0, 'cpu');"
        "objectives.models.build_model({'name': 'mlp', 'width': 8, 'depth': 1, 'dropout': 0.0,"
        " 'norm': 'none', 'activation': 'relu', 'init': 'he'}, 64, 10);"
        "print(sorted(m for m in ('torchvision', 'objectives._images', 'objectives._tables')"
        " if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    # torchvision (1.7 s to import) waits for a set or a model that needs it: a worker
    # process of the default study starts that much sooner.
    assert done.stdout.strip().splitlines()[-1] == "[]"


CLASSIFICATION = {"accuracy", "f1_macro", "precision_macro", "recall_macro", "confusion_matrix"}


@pytest.mark.parametrize(
    ("study", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")]
)
def test_mnist_idx_files_tune_through_the_cli(study: str, folder: str, tmp_path: Path) -> None:
    fake_data.write_mnist(tmp_path / "data", folder)
    stages = tune(
        tmp_path, study, f"data.root={tmp_path / 'data'}", "data.num_samples=0",
        "model.width=4", "model.depth=2", "batch_size=32",
    )  # fmt: skip
    assert_every_stage_completed(stages, CLASSIFICATION)


def test_cifar10_pickled_batches_tune_a_resnet18_through_the_cli(tmp_path: Path) -> None:
    fake_data.write_cifar10(tmp_path / "data")
    # the study's own crops and flips (on the tensors, a batch at a time); a narrow ResNet-18
    stages = tune(tmp_path, "cifar10", f"data.root={tmp_path / 'data'}", "model.width=4",
                  "batch_size=32")  # fmt: skip
    assert_every_stage_completed(stages, CLASSIFICATION)
    best = stages["architecture"].best_trial
    assert best.user_attrs["num_params"] < 200_000  # width 4: 1/16 of ResNet-18's channels


def test_an_image_folder_of_pngs_tunes_through_the_cli(tmp_path: Path) -> None:
    fake_data.write_image_folder(tmp_path / "images")
    stages = tune(tmp_path, "image_folder", "data.path=images", "data.image_size=8",
                  "data.workers=0", "model.width=4", "batch_size=8")  # fmt: skip
    assert_every_stage_completed(stages, CLASSIFICATION | {"roc_auc"})


def test_a_csv_classification_tunes_through_the_cli(tmp_path: Path) -> None:
    fake_data.write_csv(tmp_path / "table.csv", regression=False)
    stages = tune(tmp_path, "csv_classification", "data.path=table.csv")
    assert_every_stage_completed(stages, CLASSIFICATION | {"roc_auc"})


def test_a_csv_regression_tunes_all_stages_exports_and_trains_on_the_test_split(
    tmp_path: Path,
) -> None:
    fake_data.write_csv(tmp_path / "table.csv", regression=True)
    stages = tune(tmp_path, "csv_regression", "data.path=table.csv", trials=8)
    assert_every_stage_completed(stages, {"rmse", "mae", "r2", "loss"})
    # the value is the RMSE, minimized
    assert stages["lr"].direction == optuna.study.StudyDirection.MINIMIZE
    url = f"storage=sqlite:///{tmp_path}/t.db"
    assert tuner(tmp_path, "export", "study=csv_regression", url, "out=best.yaml") == 0
    assert tuner(tmp_path, "train", "config=best.yaml", "out=trained") == 0
    metrics = yamlio.load(tmp_path / "trained" / "metrics.yaml")
    assert metrics["metric"] == "rmse"
    # the test split is scored with every regression metric, in the target's units
    assert {"rmse", "mae", "r2"} <= set(metrics["test"])
    assert 0 < metrics["test"]["mae"] <= metrics["test"]["rmse"]
    # same config and seed: the tuned validation RMSE comes back
    assert metrics["validation"]["rmse"] == pytest.approx(metrics["tuned_validation"], abs=1e-9)


@pytest.mark.parametrize(
    ("study", "expected"),
    [("mnist", "MNIST/raw"), ("fashion_mnist", "FashionMNIST/raw"),
     ("cifar10", "cifar-10-batches-py")],
)  # fmt: skip
def test_missing_data_files_are_one_line_exit_2_and_nothing_written(
    study: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tuner(tmp_path, "run", f"study={study}", "data.root=nowhere") == 2
    err = capsys.readouterr().err
    assert err.startswith("tuner: ") and err.count("\n") == 1, err  # one line, no traceback
    # it names where the files are expected and how to fetch them
    assert str(tmp_path / "nowhere" / expected) in err and "data.download=true" in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_missing_csv_column_or_image_folder_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_data.write_csv(tmp_path / "table.csv")
    assert tuner(tmp_path, "run", "study=csv_regression", "data.path=table.csv",
                 "data.target=price") == 2  # fmt: skip
    assert "data.target must be a column of table.csv (a, b, colour, target)" in (
        capsys.readouterr().err
    )
    assert tuner(tmp_path, "run", "study=image_folder", "data.path=photos") == 2
    assert "photos is not a folder of images" in capsys.readouterr().err


# --- bring your own objective ----------------------------------------------------------------


def readme_example(folder: Path) -> None:
    """The README's own-objective example, as a user would copy it: module and study file."""
    text = README.read_text()
    section = text[text.index("## Bring your own objective") :]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.S)
    (folder / "myobjective.py").write_text(blocks[0][1])
    (folder / "mystudy.yaml").write_text(blocks[1][1])


def test_the_readme_objective_copied_into_a_fresh_folder_tunes_and_exports(
    tmp_path: Path,
) -> None:
    readme_example(tmp_path)
    assert tuner(tmp_path, "run", "study=mystudy.yaml", "trials=5", "epochs=3") == 0
    assert tuner(tmp_path, "export", "study=mystudy.yaml", "out=best.yaml") == 0
    document = yamlio.load(tmp_path / "best.yaml")
    assert document["objective"] == "myobjective:train"
    assert set(document["provenance"]["stages"]) == {"batch_size", "lr"}
    assert tuner(tmp_path, "train", "config=best.yaml", "out=trained") == 0
    metrics = yamlio.load(tmp_path / "trained" / "metrics.yaml")
    assert metrics["validation"]["accuracy"] > 0.8  # the rule is learnable
    assert 0 < metrics["test"]["accuracy"] <= 1


BAD_OBJECTIVES = """\
def no_metric(config, report, *, test=False):
    return {"loss": 1.0}


def one_argument(config):
    return {"accuracy": 1.0}
"""


@pytest.mark.parametrize(
    ("objective", "status", "message"),
    [
        ("nowhere.mod:train", 2, "cannot import module 'nowhere'"),
        ("bad:missing", 2, "module bad has no function 'missing'"),
        ("bad:one_argument", 2, "must take (config, report), but its signature is (config)"),
        ("bad:no_metric", 1, "5 trials in a row failed with MissingMetric: the objective"
         " returned no finite 'accuracy' (got keys: loss)"),
    ],
)  # fmt: skip
def test_a_broken_own_objective_is_one_line(
    objective: str, status: int, message: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    readme_example(tmp_path)
    (tmp_path / "bad.py").write_text(BAD_OBJECTIVES)
    sys.modules.pop("bad", None)
    assert tuner(tmp_path, "run", "study=mystudy.yaml", f"objective={objective}") == status
    out, err = capsys.readouterr()
    assert err.startswith("tuner: ") and err.count("\n") == 1, err
    assert message in err
    assert "Traceback" not in out + err  # the engine's own check: its traceback says nothing


# --- the pieces, without the command line ----------------------------------------------------

CPU = torch.device("cpu")


def config(data: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A trial config of the csv_regression study on ``data``, with ``changes``."""
    base = yamlio.load(STUDIES / "csv_regression.yaml")["defaults"]
    return {**base, "device": "cpu", "epochs": 2, "data": data, **changes}


def test_image_statistics_are_per_channel_from_the_training_split(tmp_path: Path) -> None:
    fake_data.write_cifar10(tmp_path)
    spec = {"name": "cifar10", "root": str(tmp_path), "val_fraction": 0.2}
    d = data.load(spec, 0, CPU)
    x = d.train.x
    assert isinstance(d.train, data.Split) and x.shape[1:] == (3, 32, 32) == d.input_shape
    # each channel of the training images has mean 0 and std 1
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3)
    assert len(d.mean) == 3 and d.num_classes == 10


def test_the_test_split_is_read_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_data.write_mnist(tmp_path)
    arrays = _images._arrays

    def train_only(name: str, root: str, train: bool, download: bool) -> Any:
        assert train, "read the test split"
        return arrays(name, root, train, download)

    monkeypatch.setattr(_images, "_arrays", train_only)
    spec = {"name": "mnist", "root": str(tmp_path), "val_fraction": 0.2}
    d = data.load(spec, 0, CPU)  # loads train and validation without touching the test files
    monkeypatch.setattr(_images, "_arrays", arrays)
    assert len(data.load_test(spec, d, CPU)) == 40  # t10k: all of it


def test_images_in_memory_are_cropped_and_flipped_a_batch_at_a_time(tmp_path: Path) -> None:
    fake_data.write_cifar10(tmp_path)
    spec = {"name": "cifar10", "root": str(tmp_path), "val_fraction": 0.2, "crop": 4,
            "flip": True}  # fmt: skip
    train = data.load(spec, 0, CPU).train
    # torchvision's sets stay tensors (on the device): no DataLoader, no per-sample transform
    assert isinstance(train, _images.Augmented) and (train.crop, train.flip) == (4, True)
    source = train.x
    numbered = dataclasses.replace(train, y=torch.arange(len(source)))  # labels name the image
    batches = list(numbered.batches(16, torch.Generator().manual_seed(0)))
    assert len(batches) == 80 // 16  # whole batches
    corners, flips = set(), set()
    for x, ids in batches:
        for image, i in zip(x, ids.tolist(), strict=True):
            padded = F.pad(source[i], (4, 4, 4, 4))  # zeros: each channel's training mean
            found = [(top, left, flip) for top, left in itertools.product(range(9), repeat=2)
                     for flip in (False, True)
                     if torch.equal(image, _window(padded, top, left, flip))]  # fmt: skip
            # each image is a 32x32 window of its zero-padded source, flipped or not
            assert found, i
            corners.add(found[0][:2])
            flips.add(found[0][2])
    # the windows move about the padded image, and about half the images are flipped
    assert len(corners) > 20 and flips == {False, True}
    again = list(numbered.batches(16, torch.Generator().manual_seed(0)))
    # the same generator gives the same shuffle, crops and flips
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))


def _window(padded: torch.Tensor, top: int, left: int, flip: bool) -> torch.Tensor:
    window = padded[:, top : top + 32, left : left + 32]
    return window.flip(2) if flip else window


def test_a_folder_of_images_is_augmented_per_sample_by_a_dataloader(tmp_path: Path) -> None:
    fake_data.write_image_folder(tmp_path / "images")
    spec = {"name": "image_folder", "path": str(tmp_path / "images"), "val_fraction": 0.2,
            "image_size": 12, "crop": 2, "flip": True, "workers": 0}  # fmt: skip

    def epoch() -> list[torch.Tensor]:
        d = data.load(spec, 0, CPU)
        # files are decoded (and augmented) per sample by a DataLoader
        assert isinstance(d.train, data.Batches) and isinstance(d.val, data.Split)
        torch.manual_seed(0)  # in this process (workers 0) augmentation draws from torch's RNG
        return [x for x, _ in d.train.batches(4, torch.Generator().manual_seed(0))]

    first, again = epoch(), epoch()
    # the same seeds give the same shuffled, augmented batches
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_a_table_is_encoded_with_training_statistics_only(tmp_path: Path) -> None:
    fake_data.write_csv(tmp_path / "t.csv")
    spec = {"name": "csv", "path": str(tmp_path / "t.csv"), "target": "target",
            "val_fraction": 0.25}  # fmt: skip
    d = data.load(spec, 0, CPU, task="regression")
    # a, b standardized, colour one-hot (blue, green, red): 5 features
    assert d.input_shape == (5,) and d.task == "regression"
    assert torch.allclose(d.train.x[:, :2].mean(dim=0), torch.zeros(2), atol=1e-5)
    assert set(d.train.x[:, 2:].unique().tolist()) == {0.0, 1.0}
    # training targets are standardized; validation targets keep their units
    assert abs(float(d.train.y.mean())) < 1e-5 and float(d.val.y.mean()) > 5
    assert torch.allclose(d.unscale(torch.zeros(1, 1)), torch.tensor([[d.target_mean]]))


def test_an_unseen_category_encodes_as_zeros() -> None:
    train = pd.DataFrame({"n": [1.0, 3.0], "c": ["x", "y"]})
    encode = _tables._Encoder.fit(train)
    rows = encode(pd.DataFrame({"n": [float("nan"), 3.0], "c": ["z", "x"]}))
    # a missing number is the training mean (0 once standardized); z was never seen
    assert rows.tolist() == [[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]


def test_regression_early_stops_downwards(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_data.write_csv(tmp_path / "t.csv")
    history = iter([3.0, 1.0, 2.0, 2.5, 0.5])

    def scripted(predictions: torch.Tensor, y: torch.Tensor, monitored: str) -> dict[str, float]:
        return {"rmse": next(history), "mae": 1.0, "loss": 1.0}

    monkeypatch.setattr(loop, "regression_epoch_metrics", scripted)
    spec = {"name": "csv", "path": str(tmp_path / "t.csv"), "target": "target",
            "val_fraction": 0.25}  # fmt: skip
    result = objectives.train(config(spec, epochs=5, patience=2, metric="rmse",
                                     direction="minimize"))  # fmt: skip
    # the lowest RMSE is the best epoch; two epochs without a lower one end the run
    assert (result["best_epoch"], result["rmse"], result["stop_reason"]) == (2, 1.0, "patience")


@pytest.mark.parametrize("loss", ["mse", "mae", "huber"])
def test_each_regression_loss_trains_and_scores_in_the_targets_units(
    loss: str, tmp_path: Path
) -> None:
    fake_data.write_csv(tmp_path / "t.csv")
    spec = {"name": "csv", "path": str(tmp_path / "t.csv"), "target": "target",
            "val_fraction": 0.25}  # fmt: skip
    result = objectives.train(config(spec, loss=loss, epochs=20), test=True)
    # the target's std is about 3.5: a fitted model's error is well below it
    assert result["rmse"] < 1.5 and result["r2"] > 0.8 and result["test"]["rmse"] < 1.5


def test_focal_loss_with_gamma_0_is_cross_entropy_and_down_weights_easy_samples() -> None:
    logits, y = torch.tensor([[4.0, 0.0], [0.0, 0.5]]), torch.tensor([0, 0])
    ce = losses.build_loss({"loss": "cross_entropy"})(logits, y)
    assert torch.allclose(losses.build_loss({"loss": "focal", "focal_gamma": 0.0})(logits, y), ce)
    focal = losses.build_loss({"loss": "focal", "focal_gamma": 2.0})
    # the easy (confident, right) sample counts for almost nothing
    assert float(focal(logits[:1], y[:1])) < 1e-3 * float(ce)


def test_binary_cross_entropy_takes_one_logit_and_scores_like_two() -> None:
    z, y = torch.tensor([[2.0], [-1.0], [0.5]]), torch.tensor([1, 0, 0])
    bce = losses.build_loss({"loss": "bce"})(z, y)
    assert torch.allclose(bce, F.binary_cross_entropy_with_logits(z.squeeze(1), y.float()))
    # one logit z scores as the two logits (0, z)
    two = metrics.classification_metrics(torch.cat([torch.zeros_like(z), z], dim=1), y)
    assert metrics.classification_metrics(z, y) == two


def test_regression_metrics_are_scikit_learns() -> None:
    pred, y = torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([1.5, 2.0, 3.0])
    out = metrics.regression_metrics(pred, y)
    p, t = pred.squeeze(1).double().numpy(), y.double().numpy()
    assert out["rmse"] == pytest.approx(math.sqrt(skm.mean_squared_error(t, p)))
    assert out["mae"] == pytest.approx(0.5)
    assert out["r2"] == pytest.approx(skm.r2_score(t, p))


def test_resnet18_has_a_small_input_stem_and_width_scales_its_channels() -> None:
    spec = {"name": "resnet18", "width": 64, "depth": 1, "kernel_size": 7, "dropout": 0.0,
            "norm": "batch", "activation": "relu", "init": "he"}  # fmt: skip
    net = models.build_model(spec, (3, 32, 32), 10)
    stem = net.features[0]
    assert isinstance(stem, nn.Conv2d) and stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())  # no max-pool
    # width 64 is ResNet-18 for CIFAR: 11.17M parameters; depth and kernel_size are ignored
    assert sum(p.numel() for p in net.parameters()) == 11_173_962
    narrow = models.build_model({**spec, "width": 16, "activation": "gelu"}, (3, 32, 32), 10)
    assert narrow(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert any(isinstance(m, nn.GELU) for m in narrow.modules())


@pytest.mark.parametrize("norm", ["none", "batch", "group", "layer"])
def test_cnn2d_takes_every_norm_and_images_of_any_size(norm: str) -> None:
    spec = {"name": "cnn2d", "width": 8, "depth": 5, "kernel_size": 3, "dropout": 0.1,
            "norm": norm, "activation": "leaky_relu", "init": "xavier"}  # fmt: skip
    for shape in [(1, 28, 28), (3, 7, 9)]:
        assert models.build_model(spec, shape, 4)(torch.zeros(2, *shape)).shape == (2, 4)


def test_an_image_model_on_flat_data_is_one_clear_error() -> None:
    spec = {"name": "cnn2d", "width": 8, "depth": 2, "kernel_size": 3, "dropout": 0.0,
            "norm": "batch", "activation": "relu", "init": "he"}  # fmt: skip
    with pytest.raises(ValueError, match=r"^model.name cnn2d needs images \(C, H, W\)"):
        models.build_model(spec, 64, 10)
