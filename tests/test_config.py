"""Config validation: every bad config is a one-line error naming the key, exit status 2, nothing written."""
import os

import pytest
import yaml

from conftest import CPU, REPO, TINY_DOC, copy_tiny_run, run_main, snapshot_tree, tiny_config
from schema import ConfigError, config_from_dict, config_to_dict, load_config


def test_the_shipped_config_has_the_published_settings():
    c = load_config(os.path.join(REPO, "config.yml"))
    assert (c.training.batch_size, c.training.n_epochs, c.training.n_iters, c.training.snapshot_freq) == \
        (128, 10, 200_000, 1000)
    assert (c.data.dataset, c.data.image_size, c.data.channels, c.data.logit_transform) == ("MNIST", 28, 1, False)
    assert (c.model.sigma_begin, c.model.sigma_end, c.model.num_classes, c.model.ngf) == (1.0, 0.01, 10, 64)
    assert (c.optim.optimizer, c.optim.lr, c.optim.beta1, c.optim.weight_decay, c.optim.amsgrad) == \
        ("Adam", 0.001, 0.9, 0.0, False)
    assert (c.optim.lr_schedule, c.optim.warmup) == ("constant", 0)
    assert c.training.stratified_levels is False  # a random level for each image, as the paper
    assert (c.sampling.n_steps_each, c.sampling.step_lr, c.sampling.sampler) == (100, 0.00002, "langevin")
    # the one departure: the chain starts at MNIST's mean + sigma_1 z, not U[0, 1] (README, white samples)
    assert c.sampling.init == "gaussian"


def test_config_is_read_only_and_round_trips_through_yaml():
    c = load_config(os.path.join(REPO, "config.yml"))
    with pytest.raises(AttributeError):
        c.training.batch_size = 3
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(config_to_dict(c)))) == c


BAD = [  # (override, words the message must hold)
    ({"training.ngpu": 1}, "training.ngpu: unknown key"),
    ({"model.ngf": None}, "model.ngf: missing"),
    ({"training.batch_size": "128"}, "training.batch_size: expected int"),
    ({"training.batch_size": 12.5}, "training.batch_size: expected int"),
    ({"data.logit_transform": "no"}, "data.logit_transform: expected bool"),
    ({"sampling.step_lr": "2e-5"}, "sampling.step_lr: expected a number"),
    ({"optim.lr": 0.0}, "optim.lr: must be > 0"),
    ({"optim.lr": -1.0}, "optim.lr: must be > 0"),
    ({"training.batch_size": 0}, "training.batch_size: must be >= 1"),
    ({"model.sigma_begin": 0.01}, "model.sigma_begin: must be > model.sigma_end"),
    ({"model.num_classes": 0}, "model.num_classes: must be >= 1"),
    ({"training.snapshot_freq": 0}, "training.snapshot_freq: must be >= 1"),
    ({"sampling.n_steps_each": 0}, "sampling.n_steps_each: must be >= 1"),
    ({"data.dataset": "CIFAR10"}, "data.dataset: must be MNIST"),
    ({"optim.lr_schedule": "linear"}, "optim.lr_schedule: must be constant or cosine"),
    ({"optim.warmup": -1}, "optim.warmup: must be >= 0"),
    ({"sampling.sampler": "euler"}, "sampling.sampler: must be langevin or consistent"),
]


@pytest.mark.parametrize("override,words", BAD, ids=[w.split(":")[0] + ":" + w.split(":")[1][:20] for _, w in BAD])
def test_bad_values_name_the_key(override, words, tmp_path):
    with pytest.raises(ConfigError) as e:
        config_from_dict(tiny_config(tmp_path, **override))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_unknown_and_missing_sections(tmp_path):
    cfg = tiny_config(tmp_path)
    with pytest.raises(ConfigError, match="unknown section 'extra'"):
        config_from_dict({**cfg, "extra": {}})
    del cfg["optim"]
    with pytest.raises(ConfigError, match="missing section 'optim'"):
        config_from_dict(cfg)


def test_bad_config_on_the_command_line_exits_2_and_leaves_the_run_alone(tmp_path, tiny_run, monkeypatch, capsys):
    """One real process shows the exit status of `python main.py`; the other cases run main.main here."""
    import main

    data = copy_tiny_run(tiny_run, tmp_path / "run")  # the run r, relative to the working folder: run/logs/r
    monkeypatch.chdir(tmp_path)
    before = snapshot_tree(tmp_path / "run")
    cases = {
        "malformed.yml": "training: [batch_size: 3\n",
        "unknown.yml": yaml.safe_dump(tiny_config(data, **{"model.batch_norm": False})),
        "range.yml": yaml.safe_dump(tiny_config(data, **{"optim.lr": -0.1})),
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
    p = run_main("--config", "malformed.yml", "--doc", TINY_DOC, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr
    for name in cases:
        for extra in ([], ["--resume_training"]):
            capsys.readouterr()
            assert main.main([*CPU, "--config", name, "--doc", TINY_DOC, *extra]) == 2, name
            err = capsys.readouterr().err
            errors = [line for line in err.splitlines() if line.startswith("ERROR")]
            assert len(errors) == 1 and "Traceback" not in err, err
    assert main.main([*CPU, "--config", "missing.yml", "--doc", "new"]) == 2
    assert "cannot read config missing.yml" in capsys.readouterr().err
    assert snapshot_tree(tmp_path / "run") == before


def test_an_older_config_with_cpu_counts_loads_with_them_as_its_counts(tmp_path):
    """Configs and checkpoints of an older version held --eval's CPU counts beside the GPU's; --eval now draws one
    count on every device, and an older config's is its CPU count (what its recorded figures were drawn at)."""
    import checkpoint
    from schema import with_legacy_values

    old = tiny_config("data", **{"eval.n_samples": 10000, "eval.n_samples_cpu": 100, "eval.loss_images": 10000,
                                 "eval.loss_images_cpu": 500})
    path = tmp_path / "old.yml"
    path.write_text(yaml.safe_dump(old))
    c = load_config(str(path))
    assert (c.eval.n_samples, c.eval.loss_images) == (100, 500)
    assert load_config(str(path), ["eval.n_samples=300"]).eval.n_samples == 300  # --set wins over the old key
    assert checkpoint.checkpoint_config({"config": old}, "old.pth").eval == c.eval  # a checkpoint's config too
    assert "n_samples_cpu" not in with_legacy_values(old)["eval"] and old["eval"]["n_samples_cpu"] == 100
    with pytest.raises(ConfigError, match=r"^config \S+config.yml with --set: config key eval.n_samples_cpu: "
                                         r"no longer used: .* set eval.n_samples"):
        load_config(os.path.join(REPO, "config.yml"), ["eval.n_samples_cpu=5"])
