"""The quick recipe on the machine a user has: no C++ compiler, a start that fails, a slower CPU under a time budget,
steps slower than the log interval, and Windows' file-system calls."""
import errno
import os
import re
import subprocess
import sys

import pytest
import torch

import bookkeeping
import build
import checkpoint
import common
import main
import progress
import runner
import schema
from conftest import CPU, REPO, fake_clock, sets, tiny_config, write_config

QUICK_TINY = ["training.n_iters=4", "training.snapshot_freq=2", "training.test_freq=2", "training.snapshot_grid=2",
              "training.batch_size=8", "model.ngf=4", "sampling.n_steps_each=2", "sampling.n_samples=4",
              "sampling.batch_size=4", "sampling.n_frames=3"]
FALLBACK = "torch.compile cannot build its kernels here"


# Three commands of configs/quick.yml (compile_norms on) in one fresh interpreter whose C++ compiler does not exist:
# train 4 steps, resume to 6, sample. A marker line separates what each command said on stderr.
DRIVER = """
import sys
sys.path.insert(0, {repo!r})
import main
for argv in {commands!r}:
    print("=== " + argv[-1], file=sys.stderr, flush=True)
    code = main.main(argv[:-1])
    print("=== exit %d" % code, file=sys.stderr, flush=True)
"""


@pytest.mark.slow  # a fresh interpreter: the compiler's absence must be the first thing inductor sees
def test_without_a_cxx_compiler_the_quick_recipe_trains_resumes_and_samples_eagerly(tmp_path, fake_mnist):
    run = ["--run", str(tmp_path / "run"), "--doc", "q"]
    tiny = sets(*QUICK_TINY, f"data.root={fake_mnist}")
    commands = [[*CPU, "--config", os.path.join(REPO, "configs", "quick.yml"), *run, *tiny, "train"],
                [*CPU, *run, "--resume_training", *sets("training.n_iters=6"), "resume"],
                [*CPU, *run, "--sample", "sample"]]
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "OMP_NUM_THREADS": "1",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # an empty cache: every kernel needs the compiler
    p = subprocess.run([sys.executable, "-c", DRIVER.format(repo=REPO, commands=commands)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600, env=env)
    parts = {name: (text, int(code)) for name, text, code in re.findall(r"=== (\w+)\n(.*?)=== exit (\d+)", p.stderr,
                                                                          re.S)}
    assert sorted(parts) == ["resume", "sample", "train"], p.stderr[-3000:]
    for name, (text, code) in parts.items():
        assert code == 0, (name, text[-3000:])
        warnings = [line for line in text.splitlines() if FALLBACK in line]
        assert len(warnings) == 1, (name, text[-3000:])  # exactly one, naming the cause and the way to silence it
        assert "No working C++ compiler" in warnings[0] and "--set fast.compile_norms=false" in warnings[0]
        assert "speed path: eager (fast.compile_norms could not build its kernels)" in text
    logs = tmp_path / "run" / "logs" / "q"
    assert {"checkpoint_2.pth", "checkpoint_4.pth", "checkpoint_6.pth"} <= set(os.listdir(logs))
    assert checkpoint.read_checkpoint(logs / "checkpoint.pth")["step"] == 6
    assert "resuming at step 5 of 6" in parts["resume"][0]
    samples = torch.load(logs / "samples" / "samples.pt", weights_only=True)
    assert samples.shape == (4, 1, 28, 28) and torch.isfinite(samples).all()


def test_the_eager_fallback_computes_what_the_compiled_network_does(monkeypatch):
    """compile_model on a compiler that fails: the warm-up's failure makes the network eager again, and its output
    is the plain network's; a failure that is not the compiler's is not hidden."""
    from torch._inductor.exc import InductorError

    cfg = schema.config_from_dict(tiny_config("unused", **{"fast.compile_norms": True}))
    torch.manual_seed(0)
    net = build.make_model(cfg, torch.device("cpu"))
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([0, 1, 3])
    with torch.no_grad():
        plain = net(x, y)

    def broken_compiler(model):
        model(x, y)  # reaches the compiled CIN++ ...
        raise InductorError(RuntimeError("No working C++ compiler found"), None)

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # dynamo is not needed to see the fallback
    assert build.compile_model(net, cfg, broken_compiler) == "eager (fast.compile_norms could not build its kernels)"
    assert all(m.fused is None for m in net.modules() if hasattr(m, "fused"))
    with torch.no_grad():
        torch.testing.assert_close(net(x, y), plain)

    def broken_network(model):
        raise ValueError("a shape bug, not the compiler")

    with pytest.raises(ValueError, match="a shape bug"):
        build.compile_model(build.make_model(cfg, torch.device("cpu")), cfg, broken_network)


def test_a_start_that_fails_before_step_1_is_rerun_by_the_same_command(tmp_path, fake_mnist, monkeypatch, capsys):
    cfg = write_config(tmp_path / "c.yml", tiny_config(fake_mnist, **{"training.n_iters": 4}))
    argv = [*CPU, "--config", cfg, "--run", str(tmp_path / "run"), "--doc", "f"]
    real_step = runner.TrainState.train_step

    def fails(self, *args):
        raise RuntimeError("the first step failed")

    for rerun in ([], ["--resume_training"]):  # the same command, and the resume the README names
        doc = f"f{len(rerun)}"
        monkeypatch.setattr(runner.TrainState, "train_step", fails)
        capsys.readouterr()
        assert main.main([*argv[:-1], doc]) == 1
        logs = tmp_path / "run" / "logs" / doc
        assert logs.is_dir() and not [f for f in os.listdir(logs) if f.endswith(".pth")]
        monkeypatch.setattr(runner.TrainState, "train_step", real_step)
        capsys.readouterr()
        assert main.main([*argv[:-1], doc, *rerun]) == 0, capsys.readouterr().err
        assert checkpoint.read_checkpoint(logs / "checkpoint.pth")["step"] == 4
    # a run folder that holds a checkpoint is still refused to a fresh start
    capsys.readouterr()
    assert main.main([*argv[:-1], "f0"]) == 1
    assert "already exists: pick another --doc, or pass --resume_training" in capsys.readouterr().err


def log_lines(monkeypatch, clock):
    """[(clock time, message)] of every record of the 'ncsn' logger from the next main.main on (its setup_logging
    starts the logger afresh, so the recording handler is added after it); the time is `clock`'s (FakeClock)."""
    import logging
    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append((clock.now, r.getMessage()))
    real = main.setup_logging

    def setup_then_record(*args, **kwargs):
        logger = real(*args, **kwargs)
        logger.addHandler(handler)
        return logger
    monkeypatch.setattr(main, "setup_logging", setup_then_record)
    return records


def slow_steps(monkeypatch, clock, seconds):
    """Make every training step take `seconds` of `clock` (after its real work); returns the end times of the
    steps."""
    real_step, ends = runner.TrainState.train_step, []

    def slow(self, *args):
        out = real_step(self, *args)
        clock.advance(seconds)
        ends.append(clock.now)
        return out
    monkeypatch.setattr(runner.TrainState, "train_step", slow)
    return ends


def test_slow_steps_get_their_first_progress_line_and_their_size_at_once(tmp_path, fake_mnist, monkeypatch):
    """log_freq 100 and steps of 0.25 s: the first progress line comes at the first step and the long-job line at
    the second, not at the first log step 25 s in."""
    monkeypatch.setattr(progress, "LONG_JOB_SECONDS", 1.0)
    clock = fake_clock(monkeypatch)
    ends = slow_steps(monkeypatch, clock, 0.25)
    cfg = write_config(tmp_path / "c.yml", tiny_config(fake_mnist, **{"training.n_iters": 5, "training.log_freq": 100,
                                                                       "training.test_freq": 100}))
    lines = log_lines(monkeypatch, clock)
    assert main.main([*CPU, "--config", cfg, "--run", str(tmp_path / "run"), "--doc", "s", "--progress", "20"]) == 0
    first = [(t, m) for t, m in lines if m.startswith("train: 1/5 steps")]
    sized = [(t, m) for t, m in lines if m.startswith("train: 5 steps will take about")]
    assert len(first) == 1 and first[0][0] == ends[0], lines  # at the first step, not 20 s later
    assert len(sized) == 1 and sized[0][0] == ends[1], lines  # at the second step
    assert "(4 steps/s)" in sized[0][1]  # one step in the 0.25 s between the first two


def test_under_a_budget_the_progress_counts_down_to_it(tmp_path, fake_mnist, monkeypatch):
    """A budget that stops the run long before n_iters: the start says where it will end (a warning: far short),
    every progress line gives the budget's time left and the step it ends near, and the run stops there."""
    clock = fake_clock(monkeypatch)
    slow_steps(monkeypatch, clock, 0.0625)  # 16 steps a second
    cfg = write_config(tmp_path / "c.yml", tiny_config(fake_mnist, **{"training.n_iters": 10_000,
                                                                       "training.n_epochs": 10_000,
                                                                       "training.snapshot_freq": 10_000,
                                                                       "training.max_minutes": 0.05}))  # 3 s
    lines = log_lines(monkeypatch, clock)
    assert main.main([*CPU, "--config", cfg, "--run", str(tmp_path / "run"), "--doc", "b", "--progress", "0.5"]) == 0
    text = "\n".join(m for _, m in lines)
    assert re.search(r"train: at the first rate \(16 steps/s on cpu\) the time budget ends near step 48 of 10,000 "
                     r"in 3 s: the run ends short of training.n_iters", text), text
    counting = re.findall(r"train: (\d+)/10000 steps \(\d+%\), 16 steps/s, (\d+) s left \(time budget; ends near "
                          r"48\)", text)
    # a line at the first step, then every --progress 0.5 s (8 steps); the time left rounded to whole seconds
    assert counting == [("1", "3"), ("9", "2"), ("17", "2"), ("25", "1"), ("33", "1"), ("41", "0")], text
    assert "training.max_minutes (0.05) reached at step 48 of 10000" in text, text


def test_the_budget_stops_at_the_first_step_past_it_not_at_the_next_log_step(tmp_path, fake_mnist, monkeypatch):
    """log_freq 100 at 16 steps a second and a 3 s budget: a single process stops at step 48, where the budget
    ends, not 52 steps (3 s) later at the log step, and its checkpoint is step 48's."""
    clock = fake_clock(monkeypatch)
    slow_steps(monkeypatch, clock, 0.0625)
    cfg = write_config(tmp_path / "c.yml", tiny_config(fake_mnist, **{"training.n_iters": 10_000,
                                                                       "training.n_epochs": 10_000,
                                                                       "training.log_freq": 100,
                                                                       "training.test_freq": 10_000,
                                                                       "training.snapshot_freq": 10_000,
                                                                       "training.max_minutes": 0.05}))  # 3 s
    lines = log_lines(monkeypatch, clock)
    assert main.main([*CPU, "--config", cfg, "--run", str(tmp_path / "run"), "--doc", "l"]) == 0
    text = "\n".join(m for _, m in lines)
    assert "training.max_minutes (0.05) reached at step 48 of 10000" in text, text
    assert torch.load(tmp_path / "run" / "logs" / "l" / "checkpoint.pth", weights_only=True)["step"] == 48


def test_the_budget_leaves_room_for_the_sampling_measured_here(tmp_path, fake_mnist, monkeypatch):
    """training.budget_includes_sampling: the sampling time (the network's evaluations timed at the start, plus the
    start-up allowance) comes off the training budget, and the log says how much. On a fake clock: each timed
    evaluation takes 0.125 s, each step 0.0625 s."""
    monkeypatch.setattr(bookkeeping, "SAMPLING_START_SECONDS", 176)  # of a 3-minute budget: 4 s and less are left
    clock = fake_clock(monkeypatch, tick=0.125)
    slow_steps(monkeypatch, clock, 0.0625)
    cfg = tiny_config(fake_mnist, **{"training.n_iters": 10_000, "training.n_epochs": 10_000,
                                     "training.snapshot_freq": 10_000,
                                     "training.max_minutes": 3.0, "training.budget_includes_sampling": True})
    lines = log_lines(monkeypatch, clock)
    assert main.main([*CPU, "--config", write_config(tmp_path / "c.yml", cfg), "--run", str(tmp_path / "run"),
                      "--doc", "r"]) == 0
    text = "\n".join(m for _, m in lines)
    # 4 levels x 2 steps x 1 batch = 8 evaluations x 0.125 s x 1.5 + 176 s = 177.5 s: training may take 2.5 s of the
    # 180, from the start; the 6 timed evaluations took 1.5 of them, so 1 s is left: 16 steps
    assert ("training.max_minutes 3 covers one --sample too: 4 samples take about 2 min 58 s here (8 network "
            "evaluations timed at 0.125 s each, taken 1.5 times, + 176 s to start and write), so training stops 2 s "
            "after the start") in text, text
    assert "training.max_minutes (3) reached at step 16 of 10000" in text, text
    assert torch.load(tmp_path / "run" / "logs" / "r" / "checkpoint.pth", weights_only=True)["step"] == 16


def test_the_budget_times_sampling_on_the_path_sample_runs(tmp_path, fake_mnist, monkeypatch):
    """With fast.auto the sampling path may differ from training's: the budget's timed evaluations run on
    sampling's. speedpath.choose is a stand-in that picks fp32 for training and fp32_channels_last for sampling."""
    import speedpath
    real_timed, timed = bookkeeping.timed_sampling_step, []

    def choose(config, device, kind, batch, step_builder, **kwargs):
        name = "fp32" if kind == "train" else "fp32_channels_last"
        return speedpath.with_path(config, name), name, "a stand-in"

    def spy(device, batch, sigmas):
        step_of = real_timed(device, batch, sigmas)
        return lambda cfg: timed.append(speedpath.path_of(cfg)) or step_of(cfg)
    monkeypatch.setattr(speedpath, "choose", choose)
    monkeypatch.setattr(bookkeeping, "timed_sampling_step", spy)
    cfg = tiny_config(fake_mnist, **{"training.n_iters": 2, "training.max_minutes": 3.0, "fast.auto": True,
                                     "training.budget_includes_sampling": True})
    assert main.main([*CPU, "--config", write_config(tmp_path / "c.yml", cfg), "--run", str(tmp_path / "run"),
                      "--doc", "r"]) == 0
    assert timed == ["fp32_channels_last"]
    ckpt = torch.load(tmp_path / "run" / "logs" / "r" / "checkpoint.pth", weights_only=True)
    assert [r["path"] for r in ckpt["speed_paths"]] == ["fp32"]  # and training ran on its own


def test_windows_file_calls_leave_every_checkpoint_written_and_loadable(tmp_path, fake_mnist, monkeypatch, capsys):
    """Where folders cannot be opened (os.open of a folder raises PermissionError on Windows) and os.statvfs does not
    exist, checkpoints are still written whole and load; a failed write says the free space is unknown."""
    real_open = os.open

    def no_folders(path, flags, *args, **kwargs):
        if os.path.isdir(path):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_folders)
    monkeypatch.delattr(os, "statvfs")
    cfg = write_config(tmp_path / "c.yml", tiny_config(fake_mnist, **{"training.n_iters": 4,
                                                                       "training.snapshot_freq": 2}))
    assert main.main([*CPU, "--config", cfg, "--run", str(tmp_path / "run"), "--doc", "w"]) == 0
    logs = tmp_path / "run" / "logs" / "w"
    for name in ("checkpoint_2.pth", "checkpoint_4.pth", "checkpoint.pth"):
        assert checkpoint.damage(logs / name) is None and checkpoint.read_checkpoint(logs / name)["step"] > 0
    assert common.free_bytes(str(tmp_path)) is None
    error = common.write_error(str(logs / "x.pth"), OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), 1000)
    assert "it needs 1,000 bytes, free space unknown" in str(error)


def test_a_replace_refused_while_another_process_reads_the_file_is_retried(tmp_path, monkeypatch):
    """Windows refuses os.replace onto a file another process holds open: the write waits and retries."""
    real_replace, calls = os.replace, []

    def held_open_twice(src, dst):
        calls.append(dst)
        if len(calls) <= 2:
            raise PermissionError(errno.EACCES, "The process cannot access the file", dst)
        return real_replace(src, dst)

    monkeypatch.setattr(common, "REPLACE_RETRIES", 3)
    monkeypatch.setattr(common, "REPLACE_WAIT", 0.01)
    monkeypatch.setattr(os, "replace", held_open_twice)
    common.atomic_write_bytes(str(tmp_path / "f.bin"), b"whole")
    assert (tmp_path / "f.bin").read_bytes() == b"whole" and len(calls) == 3
    assert os.listdir(tmp_path) == ["f.bin"]  # no temporary file left
