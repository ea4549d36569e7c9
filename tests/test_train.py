"""End to end on MNIST-format files written by the tests: train, checkpoint, resume, sample."""
import os
import platform

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import main
from conftest import (CPU, TINY_DOC, copy_tiny_run, event_files, scalars_of_new_event_files, snapshot_tree,
                      tiny_config, write_config)
from common import read_scalars
from schema import config_from_dict, config_to_dict


def train(tmp_path, cfg, doc, *extra):
    return main.main([*CPU, "--config", write_config(tmp_path / f"{doc}.yml", cfg), "--run", str(tmp_path / "run"),
                      "--doc", doc, *extra])


def ckpt(tmp_path, doc, name="checkpoint.pth"):
    return torch.load(tmp_path / "run" / "logs" / doc / name, weights_only=True)


def test_training_run_writes_checkpoints_config_log_and_tensorboard(tmp_path, fake_mnist, monkeypatch):
    cfg = tiny_config(fake_mnist, **{"training.n_iters": 6, "training.snapshot_freq": 3})
    monkeypatch.chdir(tmp_path)  # the default --run: run/ in the working folder
    assert main.main([*CPU, "--config", write_config(tmp_path / "c.yml", cfg), "--doc", "t"]) == 0
    logs = tmp_path / "run" / "logs" / "t"
    assert sorted(os.listdir(logs)) == [".train.lock", "checkpoint.pth", "checkpoint_3.pth", "checkpoint_6.pth",
                                        "config.yml", "stdout.txt"]
    assert (logs / ".train.lock").read_text() == f"pid {os.getpid()} on {platform.node()}\n"  # the last holder
    written = yaml.safe_load((logs / "config.yml").read_text())  # the resolved config: every key, defaults too
    assert written == config_to_dict(config_from_dict(cfg)) and written["sampling"]["denoise"] is False
    assert "step 6: saved checkpoint_6.pth" in (logs / "stdout.txt").read_text()
    c = ckpt(tmp_path, "t")
    assert set(c) == {"format", "model", "ema", "optimizer", "step", "config", "seed", "rng", "speed_paths"}
    assert c["speed_paths"] == [{"first": 1, "last": c["step"], "path": "fp32",
                              "machine": c["speed_paths"][0]["machine"]}]
    assert (c["step"], c["config"]) == (6, written)
    assert torch.equal(c["model"]["end_conv.weight"], ckpt(tmp_path, "t", "checkpoint_6.pth")["model"]["end_conv.weight"])
    scalars = read_scalars(tmp_path / "run" / "tensorboard" / "t")
    assert sorted(scalars["train_loss/raw"]) == [1, 2, 3, 4, 5, 6] and sorted(scalars["test_loss/raw"]) == [2, 4, 6]
    assert all(v > 0 for v in scalars["train_loss/raw"].values())


def test_training_stops_at_whichever_of_epochs_and_iters_comes_first(tmp_path, fake_mnist):
    # 64 images at batch 10: 7 steps an epoch (the last batch holds 4), 2 epochs = 14 steps < n_iters 50
    cfg = tiny_config(fake_mnist, **{"training.batch_size": 10, "training.n_epochs": 2, "training.n_iters": 50,
                                     "training.snapshot_freq": 100, "training.test_freq": 100})
    assert train(tmp_path, cfg, "e") == 0
    c = ckpt(tmp_path, "e")
    assert c["step"] == 14


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "plain-path"])
def test_resumed_run_ends_bitwise_equal_to_an_unbroken_one(tmp_path, fake_mnist, fast):
    switches = {f"fast.{k}": fast for k in ("bf16", "fast_kernels", "fused_adam")}
    full = tiny_config(fake_mnist, **{"training.n_iters": 12, "training.snapshot_freq": 5}, **switches)
    assert train(tmp_path, full, "full") == 0
    half = tiny_config(fake_mnist, **{"training.n_iters": 5, "training.snapshot_freq": 5}, **switches)
    assert train(tmp_path, half, "half") == 0  # stops at step 5, inside the first epoch (8 steps)
    assert ckpt(tmp_path, "half")["step"] == 5
    tb = tmp_path / "run" / "tensorboard" / "half"
    before = event_files(tb)
    # another --seed on resume: the run keeps its checkpoint's seed (a resume that took --seed, or that started
    # afresh from step 0 with --seed, could not end bitwise equal to the unbroken run below)
    assert train(tmp_path, full, "half", "--resume_training", "--seed", "99") == 0
    a, b = ckpt(tmp_path, "full"), ckpt(tmp_path, "half")
    assert a["step"] == b["step"] == 12
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["seed"] == b["seed"] == 1234
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert torch.equal(a["rng"]["generator"], b["rng"]["generator"])
    # the TensorBoard history of the first part is kept, and the second part continues at step 6
    scalars = read_scalars(tmp_path / "run" / "tensorboard" / "half")
    assert sorted(scalars["train_loss/raw"]) == list(range(1, 13))
    full_scalars = read_scalars(tmp_path / "run" / "tensorboard" / "full")
    assert scalars["train_loss/raw"] == full_scalars["train_loss/raw"]
    # the resuming process trained only steps 6..12: its own event file holds no loss of steps 1..5
    new, resumed = scalars_of_new_event_files(tb, before, tmp_path / "resumed_tb")
    assert len(new) == 1, new
    logged = sorted(resumed["train_loss/raw"])
    assert logged == list(range(6, 13)), f"the resumed process logged steps {logged}"
    assert {k: full_scalars["train_loss/raw"][k] for k in range(6, 13)} == resumed["train_loss/raw"]


def test_fresh_run_into_an_existing_folder_is_refused_and_changes_nothing(tmp_path, fake_mnist, capsys):
    cfg = tiny_config(fake_mnist, **{"training.n_iters": 3})
    assert train(tmp_path, cfg, "x") == 0
    before = snapshot_tree(tmp_path / "run")
    capsys.readouterr()
    assert train(tmp_path, cfg, "x") == 1
    assert "pick another --doc, or pass --resume_training" in capsys.readouterr().err
    assert snapshot_tree(tmp_path / "run") == before


def test_occupied_run_folder_message_on_the_command_line(tmp_path, tiny_run, monkeypatch, capsys):
    """The message names the folder as the user wrote it (relative to where main.py runs)."""
    data = copy_tiny_run(tiny_run, tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    before = snapshot_tree(tmp_path / "run")
    capsys.readouterr()
    cfg = write_config(tmp_path / "c.yml", tiny_config(data, **{"training.n_iters": 2}))
    assert main.main([*CPU, "--config", cfg, "--doc", TINY_DOC]) != 0
    assert f"run folder run/logs/{TINY_DOC} already exists: pick another --doc, or pass --resume_training" in \
        capsys.readouterr().err
    assert snapshot_tree(tmp_path / "run") == before


def test_sample_writes_grid_gif_and_tensor(tmp_path, fake_mnist):
    cfg = tiny_config(fake_mnist, **{"training.n_iters": 3, "sampling.n_samples": 6, "sampling.batch_size": 4,
                                     "sampling.n_frames": 5})
    assert train(tmp_path, cfg, "s") == 0
    out = tmp_path / "samples"
    args = [*CPU, "--run", str(tmp_path / "run"), "--doc", "s", "--sample", "-o", str(out)]
    assert main.main(args) == 0
    samples = torch.load(out / "samples.pt", weights_only=True)
    assert samples.shape == (6, 1, 28, 28) and torch.isfinite(samples).all()
    grid = Image.open(out / "samples.png")
    assert grid.size == (3 * 30 + 2, 2 * 30 + 2)  # 6 images in 3 columns, 28 px + 2 px padding
    gif = Image.open(out / "movie.gif")
    assert gif.n_frames == 5  # 5 of the 4 levels x 2 steps, evenly spaced, the last one included
    # the same seed gives the same samples; --test is the authors' name for --sample
    assert main.main([*CPU, "--run", str(tmp_path / "run"), "--doc", "s", "--test", "-o", str(tmp_path / "again")]) == 0
    assert torch.equal(torch.load(tmp_path / "again" / "samples.pt", weights_only=True), samples)
    # existing outputs are not replaced without --overwrite
    before = snapshot_tree(out)
    assert main.main(args) == 1
    assert snapshot_tree(out) == before
    assert main.main(args + ["--overwrite", "--seed", "9"]) == 0
    assert not torch.equal(torch.load(out / "samples.pt", weights_only=True), samples)


def test_sample_or_resume_without_a_checkpoint(tmp_path, fake_mnist, capsys):
    assert main.main([*CPU, "--run", str(tmp_path / "run"), "--doc", "none", "--sample", "-o", str(tmp_path / "o")]) == 1
    cfg = tiny_config(fake_mnist)
    assert train(tmp_path, cfg, "none", "--resume_training") == 1
    assert not (tmp_path / "run").exists() and not (tmp_path / "o").exists()


def test_missing_mnist_offline_names_the_folder_and_files(tmp_path, monkeypatch, capsys):
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):  # no network for the download attempt, whatever this machine has
        raise urllib.error.URLError("no network in the tests")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    cfg = write_config(tmp_path / "c.yml", tiny_config(tmp_path / "nodata"))
    capsys.readouterr()
    assert main.main([*CPU, "--config", cfg, "--run", str(tmp_path / "run"), "--doc", "m"]) == 1
    msg = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ERROR")]
    assert len(msg) == 1 and str(tmp_path / "nodata" / "MNIST" / "raw") in msg[0]
    assert "train-images-idx3-ubyte" in msg[0] and "t10k-labels-idx1-ubyte" in msg[0]
    assert not (tmp_path / "run").exists()


def test_logit_data_space_round_trip():
    import data
    cfg = config_from_dict(tiny_config("unused", **{"data.logit_transform": True}))
    to_model, to_image = data.data_space(cfg)
    x = torch.linspace(0, 1, 257)
    y = to_model(x)
    lam = data.LOGIT_LAMBDA
    p = lam + (1 - 2 * lam) * x.double()
    # logit, not the identity (rtol for fp32 at 1 - lam)
    torch.testing.assert_close(y.double(), torch.log(p / (1 - p)), rtol=2e-3, atol=1e-4)
    assert y[0] < -13 and y[-1] > 13 and y[128].abs() < 1e-6
    torch.testing.assert_close(to_image(y), x, rtol=0, atol=1e-5)  # sigmoid undoes it (up to lam)
    plain_to_model, plain_to_image = data.data_space(config_from_dict(tiny_config("unused")))
    assert torch.equal(plain_to_model(x), x) and torch.equal(plain_to_image(x), x)


def test_logit_transform_run_trains_and_samples(tmp_path, fake_mnist, monkeypatch):
    import data
    import runner
    cfg = tiny_config(fake_mnist, **{"training.n_iters": 2, "data.logit_transform": True})
    seen = []  # the clean inputs the loss receives (training and test batches): logit(dequantized pixels)
    real_dsm_loss = runner.dsm_loss
    monkeypatch.setattr(runner, "dsm_loss", lambda score_fn, x, *a, **k: seen.append(x.detach().clone()) or
                        real_dsm_loss(score_fn, x, *a, **k))
    assert train(tmp_path, cfg, "logit") == 0
    assert len(seen) >= 2
    x = torch.cat(seen)
    assert x.min() < -5  # logit((k + u) / 256) of a background pixel (k = 0): below logit(1 / 256) = -5.5
    lam = data.LOGIT_LAMBDA
    pixels = (torch.sigmoid(x.double()) - lam) / (1 - 2 * lam) * 256  # back to k + u, u in [0, 1)
    values = set(torch.cat([data.load_mnist(fake_mnist, train=t).flatten() for t in (True, False)]).tolist())
    assert set(pixels.floor().long().unique().tolist()) <= values
    out = tmp_path / "logit_samples"
    assert main.main([*CPU, "--run", str(tmp_path / "run"), "--doc", "logit", "--sample", "-o", str(out)]) == 0
    raw = torch.load(out / "samples.pt", weights_only=True)
    assert raw.shape == (4, 1, 28, 28) and torch.isfinite(raw).all()
    # the PNG shows sigmoid(raw): the grid (2 x 2 images of 28 px, 2 px padding) holds its pixels, rounded
    grid = torch.from_numpy(np.asarray(Image.open(out / "samples.png"))[..., 0].astype(np.int64))
    for k in range(4):
        r, c = 2 + (k // 2) * 30, 2 + (k % 2) * 30
        expected = (torch.sigmoid(raw[k, 0]) * 255 + 0.5).floor().clamp(0, 255).long()
        diff = (grid[r:r + 28, c:c + 28] - expected).abs().max().item()
        assert diff <= 1, f"sample {k}: the PNG differs from sigmoid(samples.pt) by {diff} levels of 255"


def test_learning_rate_warms_up_linearly_then_follows_its_schedule():
    from runner import learning_rate
    from schema import Optim
    cosine = Optim("Adam", 2e-3, 0.9, 0.0, False, lr_schedule="cosine", warmup=4)
    lrs = [learning_rate(t, cosine, 104) for t in range(1, 105)]
    assert lrs[:4] == pytest.approx([5e-4, 1e-3, 1.5e-3, 2e-3])  # lr * step / warmup
    assert lrs[4] == pytest.approx(2e-3)  # the first step after the warm-up: progress 0
    assert lrs[54] == pytest.approx(1e-3)  # half of the 100 steps after the warm-up taken: cos(pi / 2)
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:])) and 0 < lrs[-1] < 2e-3 * 1e-3  # falls to ~0 at the end
    constant = Optim("Adam", 2e-3, 0.9, 0.0, False, warmup=4)
    assert [learning_rate(t, constant, 104) for t in range(3, 105)] == pytest.approx([1.5e-3] + [2e-3] * 101)
    assert learning_rate(1, Optim("Adam", 2e-3, 0.9, 0.0, False), 104) == 2e-3  # the paper's: no warm-up


def test_cosine_run_uses_its_schedule_and_resumes_mid_decay_exactly(tmp_path, fake_mnist):
    import shutil
    from runner import learning_rate
    cfg = tiny_config(fake_mnist, **{"training.n_iters": 12, "training.snapshot_freq": 5, "optim.lr": 3e-3,
                                     "optim.lr_schedule": "cosine", "optim.warmup": 2})
    assert train(tmp_path, cfg, "full") == 0
    optim = config_from_dict(cfg).optim
    for name, step in (("checkpoint_5.pth", 5), ("checkpoint.pth", 12)):  # the lr Adam took at that step
        assert ckpt(tmp_path, "full", name)["optimizer"]["param_groups"][0]["lr"] == learning_rate(step, optim, 12)
    # the run as if it had stopped after step 5: its folder with checkpoint_5 as the latest checkpoint
    logs = tmp_path / "run" / "logs"
    shutil.copytree(logs / "full", logs / "cut")
    shutil.copy(logs / "cut" / "checkpoint_5.pth", logs / "cut" / "checkpoint.pth")
    for later in ("checkpoint_10.pth", "checkpoint_12.pth"):
        os.remove(logs / "cut" / later)
    assert train(tmp_path, cfg, "cut", "--resume_training") == 0
    a, b = ckpt(tmp_path, "full"), ckpt(tmp_path, "cut")
    assert a["step"] == b["step"] == 12
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_tensorboard_has_the_training_loss_of_each_level_at_every_log_step(tmp_path, fake_mnist):
    """train_loss/raw/level_<i>: the mean loss of the samples at level i since the last read-back. With stratified
    levels (batch 8, 4 levels: 2 samples of each level a step) every level has as many samples, so the levels'
    mean is the mean of the steps' losses (train_loss/raw) over the same steps."""
    cfg = tiny_config(fake_mnist, **{"training.n_iters": 6, "training.log_freq": 3, "training.test_freq": 6,
                                     "training.snapshot_freq": 6, "training.stratified_levels": True})
    assert train(tmp_path, cfg, "lv") == 0
    scalars = read_scalars(tmp_path / "run" / "tensorboard" / "lv")
    levels = [scalars[f"train_loss/raw/level_{i}"] for i in range(4)]
    assert all(sorted(level) == [3, 6] for level in levels)  # at each log step
    steps = scalars["train_loss/raw"]
    for last, window in ((3, (1, 2, 3)), (6, (4, 5, 6))):
        assert np.mean([level[last] for level in levels]) == pytest.approx(np.mean([steps[s] for s in window]),
                                                                           rel=1e-5)
    assert len({level[6] for level in levels}) == 4  # four levels, four values
