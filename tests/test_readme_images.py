"""bench/readme_images.py: the README's grid and movie from a --sample folder, as rundir.write_samples writes it."""
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageSequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import readme_images  # noqa: E402
import rundir  # noqa: E402

N_FRAMES, SIDE = 7, 10  # 7 frames of a 10 x 10 grid, as --sample writes 100 samples


def sample_folder(folder):
    """Frame j: the top-left 6 x 6 samples at grey level 20 (j + 1), every other sample white."""
    inside = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    inside[:6, :6] = True
    frames = []
    for j in range(N_FRAMES):
        level = torch.where(inside.flatten(), 20.0 * (j + 1) / 255, 1.0)  # (100,)
        frames.append(level.view(-1, 1, 1, 1).expand(-1, 1, 28, 28).clone())  # (100, 1, 28, 28)
    names = {n: os.path.join(folder, n) for n in ("samples.png", "samples.pt", "movie.gif")}
    rundir.write_samples(frames[-1], frames, names, lambda x: x)
    return names


def test_the_movie_keeps_the_top_left_samples_and_every_third_frame(tmp_path):
    names = sample_folder(tmp_path)
    out = tmp_path / "images"
    out.mkdir()
    assert readme_images.main([str(tmp_path), "--out", str(out)]) == 0
    with open(out / "quick_samples.png", "rb") as a, open(names["samples.png"], "rb") as b:
        assert a.read() == b.read()  # the grid as --sample wrote it
    with Image.open(out / "quick_movie.gif") as im:
        frames = [torch.from_numpy(np.array(f.convert("L"))).long() for f in ImageSequence.Iterator(im)]
    side = 6 * (28 + 2) + 2
    assert all(f.shape == (side, side) for f in frames)
    kept = [0, 3, 6]  # every third of frames 0..6; the last one (6) is among them
    assert len(frames) == len(kept)
    for f, j in zip(frames, kept):
        cells = f[2:, 2:].unfold(0, 28, 30).unfold(1, 28, 30)  # (6, 6, 28, 28): the cells without padding
        assert (cells == 20 * (j + 1)).all(), (j, cells.unique())  # inside the 6 x 6 corner, no white sample


def test_an_empty_name_writes_the_sample_commands_own_file_names_into_a_new_folder(tmp_path):
    names = sample_folder(tmp_path)
    out = tmp_path / "images" / "tenepochs"  # not there yet
    assert readme_images.main([str(tmp_path), "--out", str(out), "--name", "", "--k", "10", "--stride", "1"]) == 0
    assert sorted(os.listdir(out)) == ["movie.gif", "samples.png"]
    with open(out / "samples.png", "rb") as a, open(names["samples.png"], "rb") as b:
        assert a.read() == b.read()
    with Image.open(out / "movie.gif") as im:
        assert im.n_frames == N_FRAMES and im.size == (SIDE * 30 + 2,) * 2  # the whole grid, every frame


def test_a_folder_without_samples_is_one_line(tmp_path, capsys):
    assert readme_images.main([str(tmp_path), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "samples.png" in err and "--sample" in err
