"""Class-conditional sampling by guidance (guidance.py): the guided score on an analytic mixture, the sampler
driven by it, the classifier's use of the noise level, its cache, and the command line (`--digit`)."""
import os

import pytest
import torch

import guidance
import main
import noise
import runner
from common import NCSNError
from conftest import CPU, snapshot_tree, tiny_config, write_config, write_fake_mnist
from schema import config_from_dict
from test_damaged_files import flipped, member_bytes

# Two Gaussians N(+-MU e_1, S0^2 I) in 2-D with equal weights: noised at sigma, component k is N(m_k, v I) with
# v = S0^2 + sigma^2, the score of the mixture is -(x - E[m | x]) / v and the posterior p(k | x) is a softmax of
# -||x - m_k||^2 / (2 v). Guidance with w = 1 must turn the first into the score of the asked component.
MU, S0 = 2.0, 0.3
MEANS = torch.tensor([[-MU, 0.0], [MU, 0.0]], dtype=torch.float64)  # (2, 2): component k's mean
TOY_SIGMAS = torch.tensor([3.0, 1.0, 0.3, 0.1, 0.05], dtype=torch.float64)  # (L,)


def toy_variance(levels):
    return (S0 ** 2 + TOY_SIGMAS[levels] ** 2).view(-1, 1)  # (B, 1)


def toy_logits(x, levels):  # the exact posterior log p(k | x, sigma_i) up to a constant: (B, 2)
    return -((x[:, None, :] - MEANS) ** 2).sum(-1) / (2 * toy_variance(levels))


def toy_score(x, levels):  # the mixture's score at level i: (B, 2)
    posterior = torch.softmax(toy_logits(x, levels), dim=1)  # (B, 2)
    return -(x - posterior @ MEANS) / toy_variance(levels)


def test_guided_score_is_the_score_of_the_asked_component():
    g = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(64, 2, generator=g, dtype=torch.float64)  # (B, 2)
    levels = torch.randint(len(TOY_SIGMAS), (64,), generator=g)  # (B,)
    digits = torch.randint(2, (64,), generator=g)  # (B,) the asked component of each point
    with torch.inference_mode():  # as the sampler calls it
        guided = guidance.guided_score_fn(toy_score, toy_logits, digits, 1.0)(x, levels)
        unguided = guidance.guided_score_fn(toy_score, toy_logits, digits, 0.0)(x, levels)
    component = -(x - MEANS[digits]) / toy_variance(levels)  # (B, 2): grad log N(x; m_y, v)
    torch.testing.assert_close(guided, component, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(unguided, toy_score(x, levels))


@pytest.mark.parametrize("w", [1.0, 4.0])
def test_the_guided_sampler_moves_samples_to_the_asked_component(w):
    n = 400
    digits = torch.arange(n) % 2  # (n,) half asked for each component, interleaved
    step_lr = 0.002  # alpha_L = 0.002 against v_L = 0.0925: a stable step at every level

    def draw(scale):
        g = torch.Generator().manual_seed(1)
        x0 = 3 * torch.randn(n, 2, generator=g, dtype=torch.float64)  # (n, 2)
        score = guidance.guided_score_fn(toy_score, toy_logits, digits, scale)
        return runner.anneal_langevin_dynamics(score, x0, TOY_SIGMAS, 30, step_lr, g)  # (n, 2)

    landed = (draw(w)[:, 0] > 0).long()  # (n,) which component each sample ended in
    assert (landed == digits).float().mean() >= 0.99
    unguided = (draw(0.0)[:, 0] > 0).long()
    assert 0.3 < (unguided == digits).float().mean() < 0.7  # without guidance the asked label is a coin toss


def bars(n, seed):
    """Two classes of 28 x 28 uint8 images: a vertical bar in the left (label 0) or right (label 1) half."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(2, (n,), generator=g)  # (n,)
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    cols = torch.randint(4, 10, (n,), generator=g) + 14 * labels  # (n,)
    for k in range(n):
        images[k, 4:24, cols[k]:cols[k] + 4] = 200
    return images, labels


def test_the_classifier_is_conditioned_on_the_noise_level():
    train_u8, train_y = bars(512, 0)
    test_u8, test_y = bars(200, 1)
    sigmas = torch.tensor([40.0, 0.05])  # a level where the bars drown, and one where they are plain
    model, accuracy = guidance.train_guidance_classifier(train_u8, train_y, test_u8, test_y, sigmas, lambda x: x,
                                                         epochs=2, batch_size=32, width=8, max_shift=0,
                                                         progress=False)
    assert accuracy[1] >= 0.95 and accuracy[0] <= accuracy[1] - 0.15, accuracy
    x = guidance.noisy_images(test_u8[:8], sigmas, torch.ones(8, dtype=torch.long), lambda x: x,
                              torch.Generator().manual_seed(2))  # (8, 1, 28, 28)
    with torch.no_grad():
        at_level = [model(x, torch.full((8,), i)) for i in range(2)]  # (8, 10) each
    assert (at_level[0] - at_level[1]).abs().max() > 1e-2  # the same image reads differently at another level


def test_the_classifier_cache(tmp_path, monkeypatch):
    root = write_fake_mnist(str(tmp_path / "data"))
    config = config_from_dict(tiny_config(root))
    sigmas = noise.get_sigmas(1.0, 0.01, 4)
    model = guidance.get_guidance_classifier(config, sigmas, "cpu")
    path = os.path.join(root, "MNIST", guidance.cache_name(sigmas, False))
    cache = torch.load(path, weights_only=True)
    assert len(cache["test_accuracy_per_level"]) == 4 and cache["sigmas"] == pytest.approx(sigmas.tolist())

    def no_training(*a, **k):
        raise AssertionError("trained again")

    other = noise.get_sigmas(1.0, 0.01, 5)
    assert len(guidance.get_guidance_classifier(config, other, "cpu").sigmas) == 5  # other levels: its own file
    with monkeypatch.context() as m:  # both caches are used as they are: same weights, no training
        m.setattr(guidance, "train_guidance_classifier", no_training)
        again = guidance.get_guidance_classifier(config, sigmas, "cpu")
        assert len(guidance.get_guidance_classifier(config, other, "cpu").sigmas) == 5
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))

    torch.save({**cache, "fingerprint": "made by other code"}, path)  # a stale cache is retrained, not used
    guidance.get_guidance_classifier(config, sigmas, "cpu")
    assert torch.load(path, weights_only=True)["fingerprint"] == guidance.guidance_fingerprint(sigmas, False)

    with open(path, "rb") as f:  # a bit of a weight flipped: torch.load reads it without a word, the CRC does not
        intact = f.read()
    start, length = member_bytes(path, "/data/0")
    with open(path, "wb") as f:
        f.write(flipped(intact, start + length // 2, 0))
    with pytest.raises(NCSNError, match=r"guidance classifier cache .* is damaged \(CRC") as e:
        guidance.get_guidance_classifier(config, sigmas, "cpu")
    assert "\n" not in str(e.value) and "delete it to train the classifier again" in str(e.value)

    with open(path, "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(NCSNError, match="truncated or not a cache") as e:
        guidance.get_guidance_classifier(config, sigmas, "cpu")
    assert "\n" not in str(e.value)


def test_each_batch_gets_its_own_digits():
    config = config_from_dict(tiny_config("unused", **{"sampling.batch_size": 4}))
    seen = []

    def score_for_batch(start, stop):
        seen.append((start, stop))
        return lambda x, levels: torch.zeros_like(x)

    out = runner.draw_samples(None, noise.get_sigmas(1.0, 0.01, 2), config, 10, torch.Generator().manual_seed(0),
                              "cpu", score_for_batch=score_for_batch)
    assert out.shape == (10, 1, 28, 28) and seen == [(0, 4), (4, 8), (8, 10)]
    assert guidance.asked_digits("all", 20).tolist() == [d for d in range(10) for _ in range(2)]
    assert guidance.asked_digits("7", 3).tolist() == [7, 7, 7]


def run(capsys, *args):
    """main.main(ARGS) in this process (no new interpreter to start): (exit status, its one error line)."""
    capsys.readouterr()
    try:
        code = main.main([*CPU, *(str(a) for a in args)])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ERROR") or "error:" in line]
    assert len(lines) <= 1 and "Traceback" not in err, err
    return code, lines[0] if lines else err


@pytest.mark.parametrize("args,words", [
    (["--digit", "11"], "invalid choice: '11'"),
    (["--digit", "x"], "invalid choice: 'x'"),
    (["--digit", "3", "--guidance_scale", "-1"], "must be a number >= 0"),
    (["--digit", "3", "--guidance_scale", "nan"], "must be a number >= 0"),
])
def test_bad_digit_flags(tmp_path, capsys, args, words):
    code, line = run(capsys, "--run", tmp_path / "run", "--doc", "r", "--sample", "-o", tmp_path / "o", *args)
    assert code == 2 and words in line
    assert not (tmp_path / "o").exists() and not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A trained tiny run 'r' in <folder>/run whose data (fake MNIST) is in <folder>/data."""
    folder = tmp_path_factory.mktemp("guided")
    root = write_fake_mnist(str(folder / "data"))
    cfg = write_config(folder / "c.yml", tiny_config(root))
    assert main.main([*CPU, "--config", cfg, "--run", str(folder / "run"), "--doc", "r"]) == 0
    return folder


def test_guidance_without_a_cache_or_data_is_one_line(tmp_path, capsys, tiny_run):
    ckpt = torch.load(tiny_run / "run" / "logs" / "r" / "checkpoint.pth", weights_only=True)
    ckpt["config"]["data"]["root"] = str(tmp_path / "gone")  # a run whose data folder is not there
    os.makedirs(tmp_path / "run" / "logs" / "r")
    torch.save(ckpt, tmp_path / "run" / "logs" / "r" / "checkpoint.pth")
    before = snapshot_tree(tmp_path)
    sample = ["--run", tmp_path / "run", "--doc", "r", "--sample", "--digit", "3", "-o", tmp_path / "o"]
    code, line = run(capsys, *sample, "--guidance_scale", "2")
    assert code == 1 and "no MNIST" in line
    code, line = run(capsys, *sample, "--guidance_scale", "0")  # w = 0: guidance is off
    assert code == 1 and "needs a guidance scale above 0" in line
    assert snapshot_tree(tmp_path) == before and not (tmp_path / "o").exists()


def test_digit_all_draws_one_row_per_digit(tmp_path, capsys, tiny_run):
    from PIL import Image

    root = str(tiny_run / "data")
    sampling = write_config(tmp_path / "s.yml", tiny_config(root, **{"sampling.n_samples": 10,
                                                                     "sampling.batch_size": 4}))
    sample = ["--run", tiny_run / "run", "--doc", "r", "--sample", "--guidance_scale", "1", "--digit", "all"]
    code, err = run(capsys, *sample, "--config", sampling, "-o", tmp_path / "o")
    assert code == 0, err
    samples = torch.load(tmp_path / "o" / "samples.pt", weights_only=True)
    assert samples.shape == (10, 1, 28, 28) and torch.isfinite(samples).all()
    assert Image.open(tmp_path / "o" / "samples.png").size == (28 + 4, 10 * 30 + 2)  # 10 rows of one digit
    assert any(f.startswith(guidance.CACHE_PREFIX) for f in os.listdir(os.path.join(root, "MNIST")))
    code, line = run(capsys, *sample, "-o", tmp_path / "o4")  # the run's own 4 samples cannot make 10 rows
    assert code == 1 and "multiple of 10" in line and not (tmp_path / "o4").exists()


def test_digit_alone_samples_with_the_default_guidance_scale(tmp_path, capsys, tiny_run):
    """--sample --digit 3 without --guidance_scale: the config's sampling.guidance_scale (schema default 10), and
    the guidance steers the chain: the same seed without --digit draws other samples."""
    code, err = run(capsys, "--run", tiny_run / "run", "--doc", "r", "--sample", "--digit", "3", "-o", tmp_path / "o")
    assert code == 0, err
    assert "guidance: digit 3, scale w = 10" in err
    guided = torch.load(tmp_path / "o" / "samples.pt", weights_only=True)
    assert guided.shape == (4, 1, 28, 28)
    code, err = run(capsys, "--run", tiny_run / "run", "--doc", "r", "--sample", "-o", tmp_path / "plain")
    assert code == 0, err
    assert not torch.equal(torch.load(tmp_path / "plain" / "samples.pt", weights_only=True), guided)
