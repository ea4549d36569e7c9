"""The method learns: a tiny network trained by main.py on two fixed images lowers its loss and its score points
from a noisy image back to the image it came from."""
import os

import numpy as np
import torch
import torch.nn.functional as F

import build
import main
from common import read_scalars
from conftest import CPU, tiny_config, write_config, write_idx
from rundir import Run

N_ITERS = 100  # enough for clear margins: loss 426 -> 144, cosines 0.86 and 0.78 (150 steps: 106, 0.90, 0.85)


def write_two_patterns(root):
    """MNIST files in <root>/MNIST/raw whose images are only two fixed patterns, alternating: a bright block at
    the top left and another at the bottom right. Returns the two as uint8 (28, 28) arrays."""
    a = np.zeros((28, 28), np.uint8)
    a[4:14, 4:12] = 255
    b = np.zeros((28, 28), np.uint8)
    b[14:24, 14:24] = 255
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for prefix, n in (("train", 64), ("t10k", 8)):
        write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), np.stack([a, b] * (n // 2)))
        write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), np.zeros(n, np.uint8))
    return a, b


def mean_cosine_to_the_data(score_fn, pattern, sigmas, level, n=64, seed=5):
    """Mean over x~ = pattern + sigma z of cos(s(x~, level), (pattern - x~) / sigma^2), the direction back to
    the data (the score of the noised point mass at `pattern`)."""
    sigma = float(sigmas[level])
    z = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    x_tilde = pattern + sigma * z
    with torch.no_grad():
        s = score_fn(x_tilde, torch.full((n,), level))
    return F.cosine_similarity(s.flatten(1), ((pattern - x_tilde) / sigma ** 2).flatten(1)).mean().item()


def test_tiny_network_learns_the_score_of_two_patterns(tmp_path):
    a, _ = write_two_patterns(str(tmp_path / "data"))
    # scale_by_sigma (NCSNv2's output / sigma_i) lets so small a network reach the scale of every level quickly
    cfg = tiny_config(tmp_path / "data", **{"training.n_iters": N_ITERS, "training.n_epochs": 1000,
                                            "training.snapshot_freq": 10 ** 6, "training.test_freq": 10 ** 6,
                                            "training.log_freq": 50, "optim.lr": 3e-3,
                                            "model.scale_by_sigma": True})
    run = ["--run", str(tmp_path / "run"), "--doc", "learn"]
    assert main.main([*CPU, "--config", write_config(tmp_path / "c.yml", cfg), *run]) == 0

    loss = read_scalars(tmp_path / "run" / "tensorboard" / "learn")["train_loss/raw"]
    assert sorted(loss) == list(range(1, N_ITERS + 1))
    first = np.mean([loss[k] for k in range(1, 21)])
    last = np.mean([loss[k] for k in range(N_ITERS - 19, N_ITERS + 1)])
    # about 426 -> 144 here; a network that cannot see its input stays near 392 (= 784 / 2, the loss of s = 0)
    assert last < first / 2, f"the loss fell from {first:.1f} (first 20 steps) to {last:.1f} (last 20) only"

    device = torch.device("cpu")
    ckpt_path = Run(str(tmp_path / "run"), "learn").ckpt_path
    run_cfg, trained, sigmas, step = build.load_trained(ckpt_path, None, device, 0)
    assert step == N_ITERS
    torch.manual_seed(1234)  # the weights the run started from (TrainState.create seeds --seed, then builds)
    untrained_model = build.make_model(run_cfg, device).eval()
    untrained = build.make_score_fn(untrained_model, run_cfg, device, sigmas)
    pattern = (torch.from_numpy(a).float() + 0.5) / 256  # the dequantized pattern's mean
    for level in (1, 2):  # sigma 0.22 and 0.046 of 1 ... 0.01
        cos = mean_cosine_to_the_data(trained, pattern, sigmas, level)
        cos0 = mean_cosine_to_the_data(untrained, pattern, sigmas, level)
        assert cos > 0.6 and cos > cos0 + 0.4, \
            f"level {level}: cosine to the data {cos:.3f} after training, {cos0:.3f} before"
