"""On a GPU host: training, sampling and resume on CUDA (`--device cuda`). Skipped where torch sees no CUDA
device; `python -m pytest -m cuda` runs only these (bench/gpu_check.sh does).

Why these pass there while the rest of the suite runs on the CPU: every other test passes `--device cpu`
(conftest.CPU), so their CPU-only assumptions (bitwise resume with CPU kernels, the CPU's sample counts of
--eval, gloo under torchrun) hold on any host. Here resume is compared two ways: with --deterministic
(deterministic cuDNN and cuBLAS, the bilinear resize as matrix products) an interrupted and resumed run equals
the unbroken one bit for bit; without it, cuDNN may choose other kernels and sum in other orders, so it is
equal within a tolerance after a few steps."""
import pytest
import torch

import devices
import main
from conftest import tiny_config, write_config

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = ("--device", "cuda")
RESUME_RTOL, RESUME_ATOL = 1e-3, 1e-5  # without --deterministic: 6 steps of summation-order differences


def train(tmp_path, cfg, doc, *extra):
    return main.main([*CUDA, "--config", write_config(tmp_path / f"{doc}.yml", cfg), "--run", str(tmp_path / "run"),
                      "--doc", doc, *extra])


def weights(tmp_path, doc):
    return torch.load(tmp_path / "run" / "logs" / doc / "checkpoint.pth", weights_only=True, map_location="cpu")


def test_trains_and_samples_on_cuda(tmp_path, fake_mnist, capsys):
    cfg = tiny_config(fake_mnist, **{"training.n_iters": 4, "training.snapshot_freq": 2})
    assert train(tmp_path, cfg, "c") == 0
    err = capsys.readouterr().err
    assert "device cuda:0" in err and "fp32 (TF32 off)" in err  # the plain path is true fp32 on CUDA
    ckpt = weights(tmp_path, "c")
    assert ckpt["step"] == 4 and all(torch.isfinite(t).all() for t in ckpt["model"].values())
    out = tmp_path / "s"
    assert main.main([*CUDA, "--run", str(tmp_path / "run"), "--doc", "c", "--sample", "-o", str(out)]) == 0
    samples = torch.load(out / "samples.pt", weights_only=True)
    assert samples.shape == (4, 1, 28, 28) and samples.device.type == "cpu" and torch.isfinite(samples).all()


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic: bitwise", "default: tolerance"])
def test_resume_on_cuda_equals_an_unbroken_run(tmp_path, fake_mnist, deterministic):
    flags = ["--deterministic"] if deterministic else []
    try:
        full = tiny_config(fake_mnist, **{"training.n_iters": 6, "training.snapshot_freq": 3})
        half = tiny_config(fake_mnist, **{"training.n_iters": 3, "training.snapshot_freq": 3})
        assert train(tmp_path, full, "full", *flags) == 0
        assert train(tmp_path, half, "half", *flags) == 0
        assert train(tmp_path, full, "half", "--resume_training", *flags) == 0
        # the default case runs torch's default kernels, also after the deterministic case in this process
        assert torch.backends.cudnn.deterministic is deterministic
        assert torch.are_deterministic_algorithms_enabled() is deterministic
    finally:
        devices.set_deterministic(False)
    a, b = weights(tmp_path, "full"), weights(tmp_path, "half")
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        if deterministic:
            assert torch.equal(a["model"][k], b["model"][k]), k
        else:
            torch.testing.assert_close(b["model"][k], a["model"][k], rtol=RESUME_RTOL, atol=RESUME_ATOL, msg=k)
