"""Errors that say what is true: a checkpoint that does not load for a reason other than its bytes is not called
damaged (and resume does not fall back from it), an unforeseen error keeps its traceback in the run's log, settings
that would fail later are refused before the run starts, --set is refused where it would do nothing, and a config
file reads numbers as the command line does."""
import os
import pickle
import re

import pytest
import torch

import main
import noise
import runner
import schema
from conftest import CPU, REPO, cli, snapshot_tree, tiny_config, write_config


@pytest.fixture
def trained(tmp_path, fake_mnist, capsys):
    """A tiny run 'r' trained to step 6 with snapshots at 3 and 6, and a config that continues it to 9."""
    cfg = tiny_config(fake_mnist, **{"training.n_iters": 6, "training.snapshot_freq": 3})
    assert cli(capsys, tmp_path, "--config", write_config(tmp_path / "c6.yml", cfg), "--doc", "r")[0] == 0
    cfg["training"]["n_iters"] = 9
    return write_config(tmp_path / "c9.yml", cfg)


LOAD_FAILURES = {  # what torch.load raises on an intact file -> what the message must say
    "memory": (MemoryError(), "is intact, but loading its"),
    "cuda-oom": (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 1.00 GiB free)"),
                 "is intact, but loading it onto cpu ran out of memory (RuntimeError: CUDA out of memory"),
    "unpickling": (pickle.UnpicklingError("Weights only load failed. Unsupported global: GLOBAL foo.Bar"),
                   "is intact, but torch"),
}


@pytest.mark.parametrize("failure", sorted(LOAD_FAILURES))
def test_an_intact_checkpoint_that_does_not_load_is_named_for_its_cause(tmp_path, capsys, monkeypatch, trained,
                                                                        failure):
    exc, words = LOAD_FAILURES[failure]
    real_load = torch.load

    def load(f, *args, **kwargs):
        if str(f).endswith(os.path.join("r", "checkpoint.pth")):
            raise exc
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    before = snapshot_tree(tmp_path / "run")
    code, errors, _, _, err = cli(capsys, tmp_path, "--doc", "r", "--sample", "-o", tmp_path / "out")
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, err
    assert words in errors[0] and "damaged" not in errors[0], errors[0]
    # resume does not skip a file that verifies: it stops with the same cause, trains nothing, changes nothing
    code, errors, _, _, err = cli(capsys, tmp_path, "--config", trained, "--doc", "r", "--resume_training")
    assert code == 1 and len(errors) == 1 and words in errors[0], err
    assert "resuming from" not in err and "trained again" not in err
    assert snapshot_tree(tmp_path / "run") == before and not (tmp_path / "out").exists()


def test_an_unforeseen_error_leaves_its_traceback_in_the_runs_log(tmp_path, capsys, monkeypatch, fake_mnist):
    real_step = runner.TrainState.train_step

    def third_step_fails(self, *args):
        if self.step == 2:
            raise ZeroDivisionError("an unforeseen fault")
        return real_step(self, *args)

    monkeypatch.setattr(runner.TrainState, "train_step", third_step_fails)
    cfg = write_config(tmp_path / "c.yml", tiny_config(fake_mnist, **{"training.n_iters": 6}))
    code, errors, _, _, err = cli(capsys, tmp_path, "--config", cfg, "--doc", "u")
    log = tmp_path / "run" / "logs" / "u" / "stdout.txt"
    assert code == 1 and "Traceback" not in err, err
    assert errors == [errors[0]] and errors[0].endswith(f"ZeroDivisionError: an unforeseen fault (the traceback is in "
                                                        f"{log})"), errors
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "third_step_fails" in text
    assert "ZeroDivisionError: an unforeseen fault" in text
    # a command without a run folder: the traceback goes to a file of its own, which the line names
    monkeypatch.setattr(noise, "max_pairwise_distance", lambda x: 1 / 0)
    code, errors, _, _, err = cli(capsys, tmp_path, "--config", cfg, "--noise_design")
    where = re.search(r"ZeroDivisionError: division by zero \(the traceback is in (.+)\)$", errors[0]).group(1)
    assert code == 1 and len(errors) == 1 and "Traceback" not in err
    assert "max_pairwise_distance" in open(where).read() or "<lambda>" in open(where).read()
    os.remove(where)
    # a known error stays one line, with no traceback written anywhere
    code, errors, _, _, err = cli(capsys, tmp_path, "--doc", "u", "--resume_training", "--set", "training.n_iters=-1")
    assert code == 2 and len(errors) == 1 and "the traceback" not in errors[0]


def consistent(data, **more):
    """A tiny config that samples with consistent annealed sampling: 4 levels from 1 to 0.01, step_lr 1e-5, which
    100 steps between neighbouring levels allow (step_lr >= 1.5e-6) and 5 steps do not (>= 2.6e-5)."""
    return tiny_config(data, **{"sampling.sampler": "consistent", "sampling.n_steps_each": 100,
                                "sampling.step_lr": 1e-5, **more})


def test_a_sampler_setting_that_cannot_run_is_refused_before_the_run_starts(tmp_path, capsys, fake_mnist):
    for name, more, words in (
            ("grid", {"training.snapshot_grid": 4}, "for the snapshot grid's training.snapshot_steps_each = 5 steps"),
            ("sampling", {"sampling.step_lr": 1e-7}, "sampling.step_lr 1e-07 is outside what consistent sampling")):
        cfg = write_config(tmp_path / f"{name}.yml", consistent(fake_mnist, **more))
        code, errors, _, _, err = cli(capsys, tmp_path, "--config", cfg, "--doc", name)
        assert code == 2 and len(errors) == 1 and words in errors[0], err
        assert not (tmp_path / "run").exists()
    # the same sampling settings without the grid train and sample
    cfg = write_config(tmp_path / "ok.yml", consistent(fake_mnist, **{"training.n_iters": 2}))
    assert cli(capsys, tmp_path, "--config", cfg, "--doc", "ok")[0] == 0


def test_set_is_refused_where_it_would_do_nothing(tmp_path, capsys):
    for mode in (["--import_authors", str(tmp_path)], ["--verify"]):
        with pytest.raises(SystemExit) as e:
            main.main([*CPU, "--doc", "a", *mode, "--set", "sampling.step_lr=1e-5"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and f"--set does not apply to {mode[0]}" in err[0], err
    assert not (tmp_path / "run").exists()


def test_a_config_file_reads_2e_5_as_the_command_line_does(tmp_path):
    text = open(os.path.join(REPO, "config.yml")).read().replace("step_lr: 0.00002", "step_lr: 2e-5")
    assert "step_lr: 2e-5" in text
    (tmp_path / "c.yml").write_text(text)
    from_file = schema.load_config(str(tmp_path / "c.yml"))
    from_set = schema.load_config(os.path.join(REPO, "config.yml"), ["sampling.step_lr=2e-5"])
    assert from_file.sampling.step_lr == from_set.sampling.step_lr == 2e-05
    assert type(from_file.sampling.step_lr) is float
    (tmp_path / "q.yml").write_text(text.replace("step_lr: 2e-5", "step_lr: '2e-5'"))  # quoted: text, said so
    with pytest.raises(schema.ConfigError, match=r"sampling.step_lr: expected a number, got the text '2e-5' \(a number "
                                                 r"in quotes: remove the quotes\)"):
        schema.load_config(str(tmp_path / "q.yml"))
