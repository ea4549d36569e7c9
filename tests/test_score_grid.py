"""bench/score_grid.py: the digits of a grid picture as --sample writes it (rundir.write_samples), scored."""
import os
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import score_grid  # noqa: E402
import metrics  # noqa: E402
import rundir  # noqa: E402
from data import load_mnist  # noqa: E402
from conftest import write_fake_mnist  # noqa: E402


def write_grid(folder, images_u8, nrow):
    """images_u8 (N, 28, 28) uint8 through the writer of --sample: samples.png with `nrow` digits a row."""
    images = torch.as_tensor(images_u8).unsqueeze(1).float() / 255  # (N, 1, 28, 28)
    names = {n: os.path.join(folder, n) for n in ("samples.png", "samples.pt", "movie.gif")}
    rundir.write_samples(images, [images], names, lambda x: x, nrow=nrow)
    return names["samples.png"]


def test_a_grid_reads_back_digit_for_digit_and_scores_as_its_tensor(tmp_path, monkeypatch, capsys):
    data = write_fake_mnist(str(tmp_path / "data"), n_train=64, n_test=32)
    test_u8 = load_mnist(data, train=False)  # (32, 28, 28) uint8, through the real loader
    digits = test_u8[:12].clone()
    digits[0, 0, :] = 255  # a lit border row and column touch the gaps: they must stay the digit's
    digits[1, :, 27] = 200
    path = write_grid(tmp_path, digits, nrow=5)  # 3 rows of 5: the last 3 cells are make_grid's black filler
    read = score_grid.read_grid(path)
    assert read.shape == (15, 1, 28, 28) and read.dtype == torch.float32
    assert torch.equal((read[:12, 0] * 255).round().byte(), digits)  # row by row, every pixel
    assert not read[12:].any()
    assert torch.equal(score_grid.read_grid(path, n=12), read[:12])

    monkeypatch.setitem(metrics.TRAIN_SETTINGS, "epochs", 1)  # a classifier of the fake digits, in seconds
    assert score_grid.main([path, "--data_root", data, "--n", "12"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {path} |")]
    assert len(row) == 1, row
    expected = metrics.sample_metrics(digits.unsqueeze(1).float() / 255, metrics.get_classifier(data, "cpu"),
                                      metrics.to_unit(test_u8))
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[1] == "12" and cells[2] == f"{expected['fid']:.1f}" and cells[4] == f"{expected['inception_score']:.2f}"
    assert cells[3] == metrics.kid_text(expected["kid"], expected["kid_se"], "±") and " ± " in cells[3]
    assert cells[5] == f"{expected['mean_confidence']:.3f}"


def save_png(path, array):
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("kind", ["not a grid", "colour", "light gap", "too many", "missing"])
def test_a_picture_that_is_no_grid_is_refused_in_one_line_before_any_scoring(tmp_path, monkeypatch, capsys, kind):
    side = 2 * 30 + 2  # 2 x 2 cells
    grid = np.zeros((side, side, 3), dtype=np.uint8)
    grid[2:30, 2:30] = 90
    good = save_png(tmp_path / "good.png", grid)  # a 2 x 2 grid, three of its cells black
    flags = []
    if kind == "not a grid":
        path = save_png(tmp_path / "g.png", np.zeros((50, 50), dtype=np.uint8))
    elif kind == "colour":
        grid[5, 5, 0] = 200
        path = save_png(tmp_path / "g.png", grid)
    elif kind == "light gap":
        grid[31, 10] = 40  # inside the gap between the two rows of cells
        path = save_png(tmp_path / "g.png", grid)
    elif kind == "too many":
        path, flags = save_png(tmp_path / "g.png", grid[:, :32]), ["--n", "3"]  # 2 x 1 cells
    else:
        path = str(tmp_path / "none.png")
    monkeypatch.setattr(score_grid.ncsn, "score", lambda *a, **k: pytest.fail("scored a set with a bad picture"))
    assert score_grid.main([good, path, "--data_root", str(tmp_path), *flags]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and path in err, err
    assert re.search({"not a grid": "50 x 50 pixels, not a grid", "colour": "has colour",
                      "light gap": "light pixels between", "too many": "--n 3: .* holds 2 digits",
                      "missing": "No such file"}[kind], err), err
    assert score_grid.read_grid(good).shape == (4, 1, 28, 28)  # the 2 x 2 grid itself reads
