"""A user's path through the command line: resume with the printed command, --set, --ckpt, one mode at a time,
-o inside the run, progress lines in a log, snapshot grids, the time budget."""
import os
import re
import shlex
import signal

import pytest
import torch
import yaml

import main
from conftest import (CPU, REPO, TINY_DOC, copy_tiny_run, fake_clock, run_main, sets, snapshot_tree, tiny_config,
                      write_config)

TINY_SETS = ["training.batch_size=8", "training.snapshot_freq=2", "training.test_freq=2", "training.log_freq=1",
             "training.snapshot_grid=0", "model.ngf=4", "model.num_classes=4", "sampling.n_steps_each=2",
             "sampling.n_samples=4", "sampling.batch_size=4", "sampling.n_frames=4", "fast.compile=false",
             "fast.compile_norms=false"]


def ckpt_of(run, doc, name="checkpoint.pth"):
    return torch.load(os.path.join(run, "logs", doc, name), weights_only=True)


def one_error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.startswith("ERROR") or "error:" in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.parametrize("shipped", ["config.yml", "configs/quick.yml", "configs/ncsnv2.yml"])
def test_the_printed_resume_command_continues_a_stopped_run(tmp_path, fake_mnist, shipped, monkeypatch, capsys):
    """Ctrl-C (SIGINT) stops training with a checkpoint and a command; that command, pasted as printed (run
    from the repository), continues the run with its own config to the end. In this process: the SIGINT comes
    from the first numbered snapshot's write, through the real handler (a real process's exit status under
    SIGINT and SIGTERM: tests/test_faults.py)."""
    import bookkeeping
    run = str(tmp_path / "run")
    argv = [*CPU, "--config", os.path.join(REPO, shipped), "--run", run, "--doc", "q",
            *sets(*TINY_SETS, "training.n_iters=6", f"data.root={fake_mnist}")]
    save = bookkeeping.save_checkpoint

    def save_then_ctrl_c(run_, ckpt, numbered, **kwargs):
        save(run_, ckpt, numbered=numbered, **kwargs)
        if numbered:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(bookkeeping, "save_checkpoint", save_then_ctrl_c)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main.main(argv) == 128 + signal.SIGINT
    err = capsys.readouterr().err
    printed = re.search(r"continue with: (.*)$", err, re.M).group(1)
    words = shlex.split(printed)
    assert words[:2] == ["python", "main.py"], printed
    stopped = ckpt_of(run, "q")["step"]
    assert stopped == 3  # the step after that snapshot's: training stops after the step it is in
    monkeypatch.setattr(bookkeeping, "save_checkpoint", save)
    monkeypatch.chdir(REPO)
    assert main.main(words[2:]) == 0
    assert "resuming at step 4 of 6" in capsys.readouterr().err
    assert ckpt_of(run, "q")["step"] == 6


def test_set_continues_a_finished_run_and_a_bad_set_is_one_line(tmp_path, fake_mnist, capsys):
    cfg = write_config(tmp_path / "c.yml", tiny_config(fake_mnist, **{"training.n_iters": 4}))
    base = [*CPU, "--run", str(tmp_path / "run"), "--doc", "r"]
    assert main.main([*base, "--config", cfg]) == 0
    capsys.readouterr()
    assert main.main([*base, "--resume_training"]) == 1  # finished: the error says how to go on
    assert "--set training.n_iters=N" in capsys.readouterr().err
    before = snapshot_tree(tmp_path / "run")
    for bad, why in (("training.bogus=1", "training.bogus: unknown key"),
                     ("training.n_iters=-3", "training.n_iters: must be >= 1"),
                     ("training.n_iters", "expected KEY=VALUE"),
                     ("n_iters=6", "expected KEY=VALUE"),
                     ("optim.lr=fast", "optim.lr: expected a number")):
        assert main.main([*base, "--resume_training", "--set", bad]) == 2
        assert why in one_error_line(capsys.readouterr().err), bad
    assert snapshot_tree(tmp_path / "run") == before  # nothing written
    assert main.main([*base, "--resume_training", "--set", "training.n_iters=6"]) == 0
    assert "--set training.n_iters=6" in capsys.readouterr().err  # logged
    assert ckpt_of(tmp_path / "run", "r")["step"] == 6
    written = yaml.safe_load((tmp_path / "run" / "logs" / "r" / "config.yml").read_text())
    assert written["training"]["n_iters"] == 6  # the run's config.yml says what it was trained with


def test_ckpt_samples_a_snapshot_and_a_missing_one_lists_the_snapshots(tmp_path, fake_mnist, capsys):
    cfg = write_config(tmp_path / "c.yml", tiny_config(fake_mnist, **{"training.n_iters": 4,
                                                                       "training.snapshot_freq": 2}))
    base = [*CPU, "--run", str(tmp_path / "run"), "--doc", "r"]
    assert main.main([*base, "--config", cfg]) == 0
    for name, extra in (("two", ["--ckpt", "2"]), ("last", []), ("four", ["--ckpt", "4"]),
                        ("path", ["--ckpt", str(tmp_path / "run" / "logs" / "r" / "checkpoint_2.pth")])):
        assert main.main([*base, "--sample", "-o", str(tmp_path / name), *extra]) == 0
    pt = {n: torch.load(tmp_path / n / "samples.pt", weights_only=True) for n in ("two", "last", "four", "path")}
    assert not torch.equal(pt["two"], pt["last"])  # other weights, same seed: other samples
    assert torch.equal(pt["four"], pt["last"]) and torch.equal(pt["path"], pt["two"])
    capsys.readouterr()
    assert main.main([*base, "--sample", "-o", str(tmp_path / "x"), "--ckpt", "3"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "no checkpoint_3.pth" in line and "steps 2, 4" in line
    assert not os.path.exists(tmp_path / "x")


def test_sample_without_o_writes_into_the_run_not_the_repository(tmp_path, tiny_run, monkeypatch):
    images = os.path.join(REPO, "images")
    before = snapshot_tree(images)
    copy_tiny_run(tiny_run, tmp_path / "run")
    monkeypatch.chdir(REPO)  # run from the repository, as the README's commands are
    assert main.main([*CPU, "--run", str(tmp_path / "run"), "--doc", TINY_DOC, "--sample"]) == 0
    assert sorted(os.listdir(tmp_path / "run" / "logs" / TINY_DOC / "samples")) == ["movie.gif", "samples.png",
                                                                                     "samples.pt"]
    assert snapshot_tree(images) == before


@pytest.mark.parametrize("flags", [["--sample", "--eval"], ["--resume_training", "--sample"],
                                   ["--inpaint", "bottom", "--eval"], ["--verify", "--show_config"]])
def test_two_modes_at_once_are_a_one_line_usage_error(tmp_path, flags):
    p = run_main("--doc", "r", *flags, cwd=tmp_path)
    assert p.returncode == 2 and "not allowed with argument" in one_error_line(p.stderr)


def test_usage_errors_for_flags_without_their_command(tmp_path):
    for flags, why in ((["--sample"], "--doc NAME is required"), (["--doc", "r", "--ckpt", "2"], "--ckpt goes with"),
                       (["--doc", "r", "-o", "x"], "-o goes with"),
                       (["--doc", "r", "--sample", "--set", "model.ngf=8"], "only sampling.*, eval.*, fast.*")):
        p = run_main(*flags, cwd=tmp_path)
        assert p.returncode == 2 and why in one_error_line(p.stderr), (flags, p.stderr)


def test_progress_lines_in_a_log_for_training_and_sampling(tmp_path, fake_mnist, capsys):
    """stderr is not a terminal here (captured): progress comes as log lines with count, total, rate, time left."""
    cfg = write_config(tmp_path / "c.yml", tiny_config(fake_mnist, **{"training.n_iters": 4,
                                                                       "training.log_freq": 1}))
    base = [*CPU, "--run", str(tmp_path / "run"), "--doc", "r", "--progress", "0.001"]
    assert main.main([*base, "--config", cfg]) == 0
    err = capsys.readouterr().err
    assert re.search(r"train: 4/4 steps \(100%\), [\d.e+-]+ steps/s, 0 s left, training loss \d", err), err
    assert re.search(r"train: 1/4 steps \(25%\), [\d.e+-]+ steps/s, \d+ s left", err), err
    assert main.main([*base, "--sample"]) == 0
    err = capsys.readouterr().err
    # tiny_config: 4 levels x 2 steps, one batch
    assert re.search(r"sample: 8/8 steps \(100%\), [\d.e+-]+ steps/s, 0 s left", err), err
    assert re.search(r"sample: 1/8 steps", err), err


def test_a_long_job_says_how_long_before_it_starts(monkeypatch, ncsn_log):
    import progress
    clock = fake_clock(monkeypatch)
    monkeypatch.setattr(progress, "LONG_JOB_SECONDS", 0.0)
    with progress.Progress(1000, "sample", "steps", on="cpu") as p:
        clock.advance(0.125)
        p.update(1)
        clock.advance(0.0625)
        p.update(1)
    warned = [m for m in ncsn_log if "will take about" in m]
    assert len(warned) == 1 and "1000 steps will take about 1 min 03 s" in warned[0]  # the whole job: 998 / 16 + 0.19 s
    assert "on cpu" in warned[0]
    monkeypatch.setattr(progress, "LONG_JOB_SECONDS", 60.0)  # a slow first unit (compiling) does not size the job
    with progress.Progress(1000, "quick", "steps") as p:
        clock.advance(0.25)  # at this rate 1000 steps would take 250 s
        p.update(1)
        clock.advance(0.0009765625)  # 10 steps in 1/1024 s: the other 989 take a second
        p.update(10)
    assert not [m for m in ncsn_log if m.startswith("quick:") and "will take about" in m]


@pytest.mark.parametrize("grid", [3, 0])
def test_snapshot_grids_in_tensorboard_and_the_run_folder(tmp_path, fake_mnist, grid):
    from tensorboardX.proto import event_pb2
    cfg = write_config(tmp_path / "c.yml", tiny_config(fake_mnist, **{"training.n_iters": 4,
                                                                       "training.snapshot_freq": 2,
                                                                       "training.snapshot_grid": grid}))
    assert main.main([*CPU, "--run", str(tmp_path / "run"), "--doc", "g", "--config", cfg]) == 0
    folder = tmp_path / "run" / "logs" / "g" / "snapshot_grids"
    images = {}
    tb = tmp_path / "run" / "tensorboard" / "g"
    for name in os.listdir(tb):
        data, pos = (tb / name).read_bytes(), 0
        while pos + 12 <= len(data):
            n = int.from_bytes(data[pos:pos + 8], "little")
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 16 + n
            for v in event.summary.value:
                if v.HasField("image"):
                    images[(v.tag, event.step)] = v.image.encoded_image_string
    if grid:
        assert sorted(os.listdir(folder)) == ["step_2.png", "step_4.png"]
        assert sorted(images) == [("snapshot_grid", 2), ("snapshot_grid", 4)]
        assert all(png.startswith(b"\x89PNG") for png in images.values())
    else:
        assert not folder.exists() and not images


def test_the_time_budget_stops_after_its_step_and_resumes_bitwise(tmp_path, fake_mnist, capsys):
    """training.max_minutes tiny: the run stops after its first step (before its first log step, 2) with a numbered
    checkpoint; resumed without the budget it ends bitwise equal to an unbroken run."""
    run = str(tmp_path / "run")
    full = write_config(tmp_path / "full.yml", tiny_config(fake_mnist, **{"training.n_iters": 8,
                                                                           "training.snapshot_freq": 100}))
    assert main.main([*CPU, "--run", run, "--doc", "full", "--config", full]) == 0
    capsys.readouterr()
    assert main.main([*CPU, "--run", run, "--doc", "cut", "--config", full, "--set", "training.max_minutes=1e-9"]) == 0
    err = capsys.readouterr().err
    assert "training.max_minutes (1e-09) reached at step 1 of 8" in err, err
    assert sorted(f for f in os.listdir(os.path.join(run, "logs", "cut")) if f.endswith(".pth")) == [
        "checkpoint.pth", "checkpoint_1.pth"]
    assert ckpt_of(run, "cut")["step"] == 1
    assert main.main([*CPU, "--run", run, "--doc", "cut", "--resume_training", "--set", "training.max_minutes=0"]) == 0
    a, b = ckpt_of(run, "full"), ckpt_of(run, "cut")
    assert b["step"] == 8
    for key in ("model", "ema"):
        if a[key] is not None:
            assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert all(torch.equal(x, y) for x, y in zip(a["optimizer"]["state"][0].values(),
                                                  b["optimizer"]["state"][0].values()))


def test_show_config_prints_the_resolved_config(tmp_path, fake_mnist):
    p = run_main("--show_config", "--config", os.path.join(REPO, "configs", "quick.yml"), "--set",
                 "training.n_iters=4000", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    shown = yaml.safe_load(p.stdout)
    assert shown["training"]["n_iters"] == 4000 and shown["model"]["ngf"] == 8
    assert shown["eval"]["every_snapshots"] == 0  # a default quick.yml does not state
