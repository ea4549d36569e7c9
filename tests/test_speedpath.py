"""fast.auto: the speed path is chosen by timing each candidate (here with a fake clock), cached per machine and
network, obeyed when pinned, left alone under --deterministic and kept on a resume, and recorded in the log and
in the checkpoint."""
import dataclasses
import json
import os

import pytest
import torch

import main
import schema
import speedpath
from conftest import CPU, cli, sets, tiny_config, write_config, write_fake_mnist


class FakeClock:
    """A clock that only moves when a fake step runs: each candidate's step advances it by its own duration."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fake_steps(clock, seconds, calls):
    """step_of for speedpath.choose: the step of candidate `name` takes seconds[name] on `clock`; builds and calls
    are counted in `calls`."""
    def step_of(cfg):
        name = speedpath.path_of(cfg)
        calls.append(("build", name))

        def step():
            calls.append(("step", name))
            clock.now += seconds[name]
        return step
    return step_of


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setenv("NCSN_SPEED_CACHE", str(tmp_path / "cache.json"))
    monkeypatch.setattr(speedpath, "native_bf16", lambda device: True)  # all four paths are candidates
    return schema.config_from_dict(tiny_config(tmp_path, **{"fast.auto": True}))


@pytest.mark.parametrize("fastest", list(speedpath.PATHS))
def test_the_choice_is_the_candidate_made_fastest(config, fastest):
    clock, calls = FakeClock(), []
    seconds = {name: 2.0 for name in speedpath.PATHS} | {fastest: 1.0}
    cfg, name, why = speedpath.choose(config, torch.device("cpu"), "sample", 8, fake_steps(clock, seconds, calls),
                                      clock=clock)
    assert name == fastest and speedpath.path_of(cfg) == fastest
    assert (cfg.fast.bf16, cfg.fast.channels_last) == speedpath.PATHS[fastest] and not cfg.fast.compile
    assert "timed here" in why and f"{fastest} 1 s" in why
    # every candidate built once, warmed up, then timed; the steps take turns
    assert sorted(c for c in calls if c[0] == "build") == sorted(("build", n) for n in speedpath.PATHS)
    steps = [n for kind, n in calls if kind == "step"]
    assert len(steps) == 4 * (speedpath.WARM_UP_STEPS + speedpath.TIMED_STEPS) and steps[:4] == list(speedpath.PATHS)


def test_the_median_decides_not_one_slow_step(config):
    """A candidate with one slow step (another process took the core) still wins on its median."""
    clock, calls, durations = FakeClock(), [], {"fp32": iter([5.0, 1.0, 9.0, 1.0, 1.0]),
                                                "fp32_channels_last": iter([1.5] * 5),
                                                "bf16": iter([2.0] * 5), "bf16_channels_last": iter([3.0] * 5)}

    def step_of(cfg):
        name = speedpath.path_of(cfg)

        def step():
            clock.now += next(durations[name])
        return step
    speedpath.TIMED_STEPS, old = 3, speedpath.TIMED_STEPS
    try:
        _, name, _ = speedpath.choose(config, torch.device("cpu"), "train", 8, step_of, clock=clock)
    finally:
        speedpath.TIMED_STEPS = old
    assert name == "fp32"


def test_the_choice_is_cached_per_machine_and_network(config, tmp_path):
    clock, calls = FakeClock(), []
    seconds = {"fp32": 3.0, "fp32_channels_last": 2.0, "bf16": 1.0, "bf16_channels_last": 4.0}
    speedpath.choose(config, torch.device("cpu"), "sample", 8, fake_steps(clock, seconds, calls), clock=clock)
    cache = json.loads((tmp_path / "cache.json").read_text())["choices"]
    (key, entry), = cache.items()
    assert entry["path"] == "bf16" and entry["seconds"]["bf16"] == 1.0
    assert "ngf 4" in key and "batch 8" in key and "sample" in key and torch.__version__ in key
    calls.clear()  # the same machine, network and batch: the cache answers, nothing is timed
    cfg, name, why = speedpath.choose(config, torch.device("cpu"), "sample", 8, fake_steps(clock, {}, calls),
                                      clock=clock)
    assert name == "bf16" and cfg.fast.bf16 and not calls and "cached in" in why
    # another batch, or training, is another choice
    _, name, _ = speedpath.choose(config, torch.device("cpu"), "train", 8, fake_steps(clock, seconds, calls),
                                  clock=clock)
    assert calls and len(json.loads((tmp_path / "cache.json").read_text())["choices"]) == 2


def test_a_damaged_cache_is_timed_again_and_rewritten(config, tmp_path, caplog):
    (tmp_path / "cache.json").write_text('{"format": 1, "choices": {"trunc')
    clock, calls = FakeClock(), []
    seconds = {"fp32": 3.0, "fp32_channels_last": 1.0, "bf16": 2.0, "bf16_channels_last": 4.0}
    _, name, _ = speedpath.choose(config, torch.device("cpu"), "train", 8, fake_steps(clock, seconds, calls),
                                  clock=clock)
    assert name == "fp32_channels_last" and calls
    assert any("cannot be read" in r.message and "timing the paths again" in r.message for r in caplog.records)
    assert json.loads((tmp_path / "cache.json").read_text())["choices"]


@pytest.mark.parametrize("pinned", list(speedpath.PATHS))
def test_a_pinned_path_is_obeyed_and_nothing_is_timed(config, pinned):
    bf16, channels_last = speedpath.PATHS[pinned]
    cfg = dataclasses.replace(config, fast=dataclasses.replace(config.fast, auto=False, bf16=bf16,
                                                               channels_last=channels_last))
    clock, calls = FakeClock(), []
    got, name, why = speedpath.choose(cfg, torch.device("cpu"), "train", 8,
                                      fake_steps(clock, {n: 1.0 for n in speedpath.PATHS}, calls), clock=clock)
    assert got is cfg and name == pinned and not calls and "fast.auto is off" in why


@pytest.mark.parametrize("case", ["deterministic", "ranks", "resume"])
def test_no_timed_choice_under_deterministic_ranks_or_a_resume_on_this_machine(config, case):
    clock, calls = FakeClock(), []
    step_of = fake_steps(clock, {n: 1.0 for n in speedpath.PATHS}, calls)
    kwargs = {"deterministic": {"deterministic": True}, "ranks": {"world": 2},
              "resume": {"keep": "fp32_channels_last"}}[case]
    cfg, name, why = speedpath.choose(config, torch.device("cpu"), "train", 8, step_of, clock=clock, **kwargs)
    assert not calls
    assert name == ("fp32_channels_last" if case == "resume" else "fp32")
    assert (cfg.fast.bf16, cfg.fast.channels_last) == speedpath.PATHS[name]


def test_without_native_bf16_only_the_fp32_paths_are_timed(config, monkeypatch):
    monkeypatch.setattr(speedpath, "native_bf16", lambda device: False)
    clock, calls = FakeClock(), []
    _, name, why = speedpath.choose(config, torch.device("cpu"), "sample", 8,
                                    fake_steps(clock, {"fp32": 2.0, "fp32_channels_last": 1.0}, calls), clock=clock)
    assert name == "fp32_channels_last" and {n for _, n in calls} == {"fp32", "fp32_channels_last"}
    assert "not timed: bf16, bf16_channels_last (no native bf16" in why


def test_training_is_not_put_on_bf16_by_a_timing(config, tmp_path):
    """Native bf16 and bf16 the fastest: training times only the fp32 paths and says why; a bf16 choice cached for
    training, or the bf16 path of a checkpoint's last steps, is timed again on fp32; sampling may still choose bf16,
    and a config that pins fast.bf16 trains in it."""
    seconds = {"fp32": 3.0, "fp32_channels_last": 2.0, "bf16": 1.0, "bf16_channels_last": 1.5}
    device = torch.device("cpu")
    for keep in (None, "bf16"):
        clock, calls = FakeClock(), []
        (tmp_path / "cache.json").write_text(json.dumps({"format": speedpath.CACHE_FORMAT, "choices": {
            speedpath.choice_key(config, device, "train", 8): {"path": "bf16", "seconds": seconds}}}))
        cfg, name, why = speedpath.choose(config, device, "train", 8, fake_steps(clock, seconds, calls), keep=keep,
                                          clock=clock)
        assert name == "fp32_channels_last" and not cfg.fast.bf16
        assert {n for _, n in calls} == {"fp32", "fp32_channels_last"}
        assert "not timed: bf16, bf16_channels_last (bf16 autocast is not chosen for training" in why
        assert ("the checkpoint's last steps ran bf16, which this choice leaves" in why) == (keep == "bf16")
    clock = FakeClock()
    assert speedpath.choose(config, device, "sample", 8, fake_steps(clock, seconds, []), clock=clock)[1] == "bf16"
    pinned = dataclasses.replace(config, fast=dataclasses.replace(config.fast, auto=False, bf16=True))
    assert speedpath.choose(pinned, device, "train", 8, fake_steps(FakeClock(), seconds, []))[1] == "bf16"


def test_a_real_run_logs_its_choice_records_it_and_resumes_on_its_path_bitwise(tmp_path, capsys, monkeypatch):
    """A tiny run with fast.auto (the real steps timed by the real clock): the log names the path and the timings
    it chose from, the checkpoint records the path of each step range, and a resume keeps the checkpoint's path
    even where the cache is gone, ending bit for bit where the unbroken run ends."""
    monkeypatch.setenv("NCSN_SPEED_CACHE", str(tmp_path / "cache.json"))
    data = write_fake_mnist(tmp_path / "data")
    c6 = write_config(tmp_path / "c6.yml", tiny_config(data, **{"fast.auto": True, "training.n_iters": 6}))
    code, errors, _, _, err = cli(capsys, tmp_path, "--config", c6, "--doc", "full")
    assert code == 0 and not errors, err
    assert "fast.auto: timing 4 speed paths for train at batch 8" in err or \
        "fast.auto: timing 2 speed paths for train at batch 8" in err
    chosen = err.split("speed path for training: ")[1].split(",")[0]
    assert chosen in speedpath.PATHS and "timed here (" in err
    full = torch.load(tmp_path / "run" / "logs" / "full" / "checkpoint.pth", weights_only=True)
    assert [(r["first"], r["last"], r["path"]) for r in full["speed_paths"]] == [(1, 6, chosen)]
    assert full["config"]["fast"]["auto"] is True
    # the same run in two sittings, with the cache deleted in between: the resume keeps the checkpoint's path
    c3 = write_config(tmp_path / "c3.yml", tiny_config(data, **{"fast.auto": True, "training.n_iters": 3}))
    code, errors, _, _, err = cli(capsys, tmp_path, "--config", c3, "--doc", "two")
    assert code == 0 and "cached in" in err, err
    os.remove(tmp_path / "cache.json")
    code, errors, _, _, err = cli(capsys, tmp_path, "--config", c6, "--doc", "two", "--resume_training")
    assert code == 0 and not errors, err
    assert f"speed path for training: {chosen}, the path this run was trained on here" in err
    two = torch.load(tmp_path / "run" / "logs" / "two" / "checkpoint.pth", weights_only=True)
    assert [(r["first"], r["last"], r["path"]) for r in two["speed_paths"]] == [(1, 3, chosen), (4, 6, chosen)]
    assert all(torch.equal(two["model"][k], full["model"][k]) for k in full["model"])


def test_sampling_chooses_its_own_path_and_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NCSN_SPEED_CACHE", str(tmp_path / "cache.json"))
    data = write_fake_mnist(tmp_path / "data")
    c = write_config(tmp_path / "c.yml", tiny_config(data, **{"training.n_iters": 2}))
    assert main.main([*CPU, "--config", c, "--run", str(tmp_path / "run"), "--doc", "s"]) == 0
    code, errors, _, _, err = cli(capsys, tmp_path, "--doc", "s", "--sample", *sets("fast.auto=true"))
    assert code == 0 and not errors, err
    assert "fast.auto: timing" in err and "for sample at batch 4" in err and "speed path for sampling: " in err
    code, errors, _, _, err = cli(capsys, tmp_path, "--doc", "s", "--sample", "--overwrite", *sets("fast.auto=true"))
    assert code == 0 and "fast.auto: timing" not in err and "cached in" in err, err
