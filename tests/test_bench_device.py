"""--device of bench/quality.py, bench/guidance.py and bench/first_level.py: the CPU unless asked (their README
rows are CPU rows, also on a machine with a GPU), the device asked for where it is there, and a one-line error
where it is not."""
import importlib.util
import os

import pytest
import torch

from conftest import REPO, tiny_config, write_config
from test_devices import pretend_gpus_everywhere


def load_bench(name):
    """bench/<name>.py as the module bench_<name> (bench/guidance.py would clash with guidance.py)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(REPO, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Stop(Exception):
    pass


def test_quality_trains_and_scores_on_the_device_it_is_given(monkeypatch, tmp_path, fake_mnist, capsys):
    """Every main.py command bench/quality.py runs carries its --device: cpu by default, even where CUDA is
    there (it used main.py's auto, so a GPU host trained its CPU rows on the GPU)."""
    quality = load_bench("quality")
    pretend_gpus_everywhere(monkeypatch)
    commands = []
    monkeypatch.setattr(quality.main, "main", lambda argv: commands.append(argv) or 1)  # stop after the first
    cfg = write_config(tmp_path / "c.yml", tiny_config(fake_mnist))
    flags = ["--config", cfg, "--data_root", fake_mnist, "--steps", "2"]
    assert quality.main_bench([*flags, "--out", str(tmp_path / "a")]) == 1
    assert quality.main_bench([*flags, "--out", str(tmp_path / "b"), "--device", "cuda:0"]) == 1
    (default,), (asked,) = commands[:1], commands[1:]
    assert default[default.index("--device") + 1] == "cpu"
    assert asked[asked.index("--device") + 1] == "cuda:0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    capsys.readouterr()
    assert quality.main_bench([*flags, "--out", str(tmp_path / "c"), "--device", "cuda"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA is not available" in err[0] and not (tmp_path / "c").exists()
    assert len(commands) == 2


@pytest.mark.parametrize("name", ["guidance", "first_level"])
def test_guidance_and_first_level_run_on_the_device_they_are_given(monkeypatch, tmp_path, capsys, name):
    """The device reaches the checkpoint's loading (build.load_trained): cpu by default with CUDA and MPS
    reported present, cuda:0 when asked; an absent device is one line and exit 1."""
    bench = load_bench(name)
    pretend_gpus_everywhere(monkeypatch)
    used = []

    def load_trained(path, config, device, seed):
        used.append(device)
        raise Stop()

    monkeypatch.setattr(bench.build, "load_trained", load_trained)
    if name == "first_level":
        monkeypatch.setattr(bench.checkpoint, "load_checkpoint", lambda path: {})
        monkeypatch.setattr(bench.checkpoint, "checkpoint_config", lambda ckpt, path: tiny_config_object())
        args = [str(tmp_path / "checkpoint.pth")]
    else:
        args = ["--run", str(tmp_path / "run"), "--doc", "x", "-o", str(tmp_path / "out")]
    for extra in ([], ["--device", "cuda:0"]):
        with pytest.raises(Stop):
            bench.main([*args, *extra])
    assert used == [torch.device("cpu"), torch.device("cuda", 0)]
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    capsys.readouterr()
    assert bench.main([*args, "--device", "mps"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MPS backend is not available" in err[0], err


def tiny_config_object():
    from schema import config_from_dict

    return config_from_dict(tiny_config("unused"))


def test_quality_reference_rows_give_kid_beside_fid(monkeypatch, fake_mnist, capsys):
    """--reference prints FID, KID with its standard error (as --eval's line writes them), IS and confidence of
    the training images it picks and of noise, each the scores metrics.sample_metrics gives those images."""
    import data
    import metrics
    quality = load_bench("quality")
    torch.manual_seed(0)
    classifier = metrics.DigitClassifier().eval()  # untrained: the rows' arithmetic, not their values
    monkeypatch.setattr(quality.metrics, "get_classifier", lambda root, device: classifier)
    assert quality.main_bench(["--reference", "--n_reference", "20", "--data_root", fake_mnist,
                               "--seeds", "5"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert lines[0] == "| set | n | FID | KID (± se) | IS | confidence |"
    train_u8 = data.load_mnist(fake_mnist, train=True)
    reference = metrics.reference_stats(classifier, metrics.to_unit(data.load_mnist(fake_mnist, train=False)))
    pick = torch.randperm(len(train_u8), generator=torch.Generator().manual_seed(5))[:20]
    want = metrics.sample_metrics(metrics.to_unit(train_u8[pick]), classifier, reference)
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[1:4] == ["20", f"{want['fid']:.2f}", f"{want['kid']:.3g} ± {want['kid_se']:.2g}"]
    assert len(lines) == 4 and all(len(line.strip("|").split("|")) == 6 for line in lines)
