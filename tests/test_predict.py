"""A finished run is a model a user can apply: `sfprompt.load_run` and `sfprompt predict`."""

import csv

import pytest
import torch

import sfprompt
from sfprompt.cli import main
from sfprompt.runner import run

from test_runner import tiny_config


def finished_run(imagefolder, tmp_path, **changes):
    summary = run(tiny_config(imagefolder, tmp_path, rounds=1, **changes), progress=False, log=lambda _: None)
    return tmp_path / "run", summary


@pytest.mark.parametrize("changes", [{}, {"method": "fl"}, {"shuffle_tokens": True, "clip_norm": 5.0,
                                                             "noise_multiplier": 0.1}],
                         ids=["sfprompt", "fl", "sfprompt-defended"])
def test_predict_reproduces_the_runs_test_accuracy(imagefolder, tmp_path, capsys, changes):
    folder, summary = finished_run(imagefolder, tmp_path, **changes)
    out = tmp_path / "predictions.csv"
    assert main(["predict", "--from", str(folder), "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 12  # the test split: 3 classes x 4
    accuracy = sum(int(r["label"]) == int(r["predicted"]) for r in rows) / len(rows)
    assert accuracy == summary["final_accuracy"]
    assert f"accuracy {summary['final_accuracy']:.4f}" in capsys.readouterr().out
    first = rows[0]
    assert first["predicted_class"] == f"class_{first['predicted']}"  # the dataset's class names
    probabilities = [float(first[f"p[class_{k}]"]) for k in range(3)]
    assert sum(probabilities) == pytest.approx(1, abs=1e-5) and max(probabilities) == float(first["probability"])


def test_load_run_is_one_module_giving_the_runs_predictions(imagefolder, tmp_path):
    folder, _ = finished_run(imagefolder, tmp_path)
    model = sfprompt.load_run(folder)
    assert isinstance(model, torch.nn.Module) and not model.training
    assert model.classes == ["class_0", "class_1", "class_2"] and model.round == 1
    from PIL import Image

    image = model.transform(Image.open(next((imagefolder / "test" / "class_1").iterdir())))
    logits = model(image.unsqueeze(0))
    assert logits.shape == (1, 3)
    assert torch.equal(sfprompt.load_run(folder / "global.safetensors")(image.unsqueeze(0)), logits)
    names = {name for name, _ in model.named_parameters()}
    assert "params.prompts" in names and any(name.startswith("body.") for name in names)


def test_predict_on_an_image_folder_and_bad_input(imagefolder, tmp_path, capsys):
    folder, _ = finished_run(imagefolder, tmp_path)
    assert main(["predict", "--from", str(folder), "--images", str(imagefolder / "test"), "--no-progress"]) == 0
    rows = list(csv.DictReader((folder / "predictions.csv").open()))
    assert len(rows) == 12 and rows[0]["sample"] == "class_0/0.png" and rows[0]["label"] == ""
    assert main(["predict", "--from", str(tmp_path / "nowhere")]) == 2
    assert main(["predict", "--from", str(folder), "--images", str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["predict", "--from", str(folder), "--images", str(tmp_path / "empty")]) == 2
    assert "no image files there" in capsys.readouterr().err
