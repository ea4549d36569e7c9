"""FID, the Inception-style score and the cached digit classifier, checked against closed-form answers."""
import os
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import metrics
from conftest import CPU, write_fake_mnist
from common import NCSNError


class FixedClassifier(nn.Module):
    """Stand-in with fixed logits: predicts class round(9 * mean pixel) with certainty (logit gap 60).

    Its features are the first 8 pixels, enough for FID to run."""

    def features(self, x):
        return x.flatten(1)[:, :8]  # (B, 8)

    def forward(self, x):
        k = (9 * x.flatten(1).mean(1)).round().long().clamp(0, 9)  # (B,)
        return 60.0 * F.one_hot(k, 10).float()  # (B, 10)


class UnsureClassifier(FixedClassifier):
    """Stand-in whose p(y|x) is uniform for every image."""

    def forward(self, x):
        return torch.zeros(len(x), 10)


def digit_images(classes, seed=0):
    """Images (N, 1, 28, 28) that FixedClassifier puts in `classes`: the constant k / 9 plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    k = torch.as_tensor(classes, dtype=torch.float32).view(-1, 1, 1, 1)
    return (k / 9 + 0.01 * torch.randn(len(k), 1, 28, 28, generator=g)).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------------
# Frechet distance

def test_identical_feature_sets_have_zero_fid():
    f = np.random.default_rng(0).normal(size=(400, 16)) @ np.random.default_rng(1).normal(size=(16, 16))
    mu, cov = metrics.feature_stats(f)
    assert mu.shape == (16,) and cov.shape == (16, 16) and mu.dtype == np.float64
    assert abs(metrics.frechet_distance(mu, cov, mu, cov)) < 1e-8 * np.trace(cov)


def test_isotropic_gaussians_have_the_closed_form_distance():
    # N(0, a^2 I) and N(d, b^2 I) in D dimensions: ||d||^2 + D (a - b)^2
    D, a, b = 6, 0.7, 1.9
    d = np.arange(1.0, D + 1)
    expected = d @ d + D * (a - b) ** 2
    got = metrics.frechet_distance(np.zeros(D), a ** 2 * np.eye(D), d, b ** 2 * np.eye(D))
    assert got == pytest.approx(expected, rel=1e-10)
    # the same from sampled features: the estimate converges to it
    rng = np.random.default_rng(0)
    f1, f2 = a * rng.normal(size=(50000, D)), d + b * rng.normal(size=(50000, D))
    sampled = metrics.frechet_distance(*metrics.feature_stats(f1), *metrics.feature_stats(f2))
    assert sampled == pytest.approx(expected, rel=0.01)


def test_general_covariances():
    rng = np.random.default_rng(3)
    A = rng.normal(size=(5, 5))
    S = A @ A.T + 0.1 * np.eye(5)
    d = rng.normal(size=5)
    # equal covariances: only the means count
    assert metrics.frechet_distance(np.zeros(5), S, d, S) == pytest.approx(d @ d, rel=1e-8)
    # diagonal (commuting) covariances: sum_k (sqrt(s1_k) - sqrt(s2_k))^2
    s1, s2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    expected = np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert metrics.frechet_distance(np.zeros(5), np.diag(s1), np.zeros(5), np.diag(s2)) == pytest.approx(expected)
    # symmetric in its two arguments
    B = rng.normal(size=(5, 5))
    T = B @ B.T
    assert metrics.frechet_distance(d, S, np.zeros(5), T) == pytest.approx(
        metrics.frechet_distance(np.zeros(5), T, d, S), rel=1e-8)


def test_fewer_samples_than_features():
    # covariances of rank N - 1 < D: sqrtm of their product is inaccurate; the result must still be real,
    # zero for one set against itself, and equal to the commuting closed form where that applies
    rng = np.random.default_rng(4)
    f1, f2 = rng.normal(size=(8, 128)), 2 * rng.normal(size=(8, 128)) + 0.3
    mu1, cov1 = metrics.feature_stats(f1)
    mu2, cov2 = metrics.feature_stats(f2)
    d = metrics.frechet_distance(mu1, cov1, mu2, cov2)
    assert np.isfinite(d) and d == pytest.approx(metrics.frechet_distance(mu2, cov2, mu1, cov1), rel=1e-6)
    assert d > 128 * 0.3 ** 2 and abs(metrics.frechet_distance(mu1, cov1, mu1, cov1)) < 1e-6 * np.trace(cov1)
    Q, _ = np.linalg.qr(rng.normal(size=(64, 64)))
    s1 = np.where(rng.random(64) < 0.6, 0.0, rng.uniform(0.5, 3, 64))
    s2 = np.where(rng.random(64) < 0.6, 0.0, rng.uniform(0.5, 3, 64))
    got = metrics.frechet_distance(np.zeros(64), Q @ np.diag(s1) @ Q.T, np.zeros(64), Q @ np.diag(s2) @ Q.T)
    assert got == pytest.approx(np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2), rel=1e-6)
    assert metrics._trace_sqrt_product(Q @ np.diag(s1) @ Q.T, Q @ np.diag(s2) @ Q.T) == pytest.approx(
        np.sqrt(s1 * s2).sum(), rel=1e-6)
    # ReLU-like features of 8 and 64 samples, where sqrtm's root has imaginary entries of about 30: the trace
    # term must still be the sum of the square roots of the eigenvalues of cov1 cov2
    rng = np.random.default_rng(2)
    g1 = np.maximum(rng.normal(size=(8, 128)) * rng.uniform(0, 5, 128), 0)
    g2 = np.maximum(rng.normal(size=(64, 128)) * rng.uniform(0, 1, 128) - 0.5, 0)
    (m1, c1), (m2, c2) = metrics.feature_stats(g1), metrics.feature_stats(g2)
    eig = np.linalg.eigvals(c1 @ c2).real
    expected = (m1 - m2) @ (m1 - m2) + np.trace(c1) + np.trace(c2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum()
    assert metrics.frechet_distance(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-6)


def test_singular_covariances_and_bad_shapes():
    # rank-1 covariances (dead ReLU units make these): finite and real, close to the closed form
    u = np.array([1.0, 0.0, 0.0])
    got = metrics.frechet_distance(np.zeros(3), np.outer(u, u), np.zeros(3), 4 * np.outer(u, u))
    assert got == pytest.approx(1.0, abs=1e-4)  # (1 - 2)^2 along u
    with pytest.raises(NCSNError, match="shapes"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(NCSNError, match="N >= 2"):
        metrics.feature_stats(np.zeros((1, 4)))


# ----------------------------------------------------------------------------------------------------------
# Inception-style score and class statistics

def test_one_certain_class_scores_1():
    out = metrics.sample_metrics(digit_images([3] * 40), FixedClassifier(), digit_images(list(range(10)) * 4))
    assert out["inception_score"] == pytest.approx(1.0, abs=1e-9)
    assert out["class_shares"] == pytest.approx([0, 0, 0, 1, 0, 0, 0, 0, 0, 0])
    assert out["mean_confidence"] == pytest.approx(1.0, abs=1e-9)


def test_ten_certain_classes_in_equal_shares_score_10():
    images = digit_images(list(range(10)) * 5)
    out = metrics.sample_metrics(images, FixedClassifier(), images)
    assert out["inception_score"] == pytest.approx(10.0, rel=1e-9)
    assert out["class_shares"] == pytest.approx([0.1] * 10)
    assert sum(out["class_shares"]) == pytest.approx(1.0, abs=1e-12)
    assert out["fid"] == pytest.approx(0.0, abs=1e-6)  # the reference is the same set
    assert out["n_images"] == 50 and out["nonfinite_images"] == 0
    # two classes half and half: 2; uncertain predictions: 1, with confidence 1/10
    assert metrics.sample_metrics(digit_images([2, 7] * 10), FixedClassifier(), images)["inception_score"] == \
        pytest.approx(2.0, rel=1e-9)
    unsure = metrics.sample_metrics(images, UnsureClassifier(), images)
    assert unsure["inception_score"] == pytest.approx(1.0) and unsure["mean_confidence"] == pytest.approx(0.1)


def test_inception_score_of_probabilities():
    assert metrics.inception_score(np.eye(4)) == pytest.approx(4.0)
    p = np.array([[0.9, 0.1], [0.1, 0.9]])
    kl = 0.9 * np.log(0.9 / 0.5) + 0.1 * np.log(0.1 / 0.5)
    assert metrics.inception_score(p) == pytest.approx(np.exp(kl))


def test_real_classifier_metrics_are_deterministic_and_clamp_their_input():
    torch.manual_seed(0)
    clf = metrics.DigitClassifier().eval()
    g = torch.Generator().manual_seed(1)
    images = torch.rand(300, 1, 28, 28, generator=g) * 1.4 - 0.2  # outside [0, 1]: clamped
    reference = torch.rand(300, 1, 28, 28, generator=g) ** 3
    a = metrics.sample_metrics(images, clf, reference, batch_size=128)
    b = metrics.sample_metrics(images.clone(), clf, metrics.reference_stats(clf, reference), batch_size=64)
    c = metrics.sample_metrics(images.clamp(0, 1), clf, reference)
    assert a == b == c
    assert set(a) == {"fid", "kid", "kid_se", "inception_score", "class_shares", "mean_confidence", "n_images",
                      "nonfinite_images", "white_share"}
    assert len(a["class_shares"]) == 10 and sum(a["class_shares"]) == pytest.approx(1.0)
    assert a["fid"] > 0 and 1 <= a["inception_score"] <= 10 and 0.1 <= a["mean_confidence"] <= 1
    same = metrics.sample_metrics(reference, clf, reference)
    assert abs(same["fid"]) < 1e-6 * a["fid"]
    assert a["kid"] > 3 * a["kid_se"] > 0  # noise is far from these digits, and KID says so beyond its error


# ----------------------------------------------------------------------------------------------------------
# KID

def test_mmd2_unbiased_is_its_definition():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 3)), rng.normal(1.0, 2.0, size=(7, 3))

    def k(a, b):
        return (a @ b / 3 + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    yy = sum(k(y[i], y[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    xy = sum(k(a, b) for a in x for b in y) / (5 * 7)
    assert metrics.mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_is_unbiased_at_a_small_count_where_fid_is_not():
    """Features of N(0.3, I) against a reference of N(0, I): KID of 20 samples, averaged over 200 draws, is KID of
    2,000 samples within its standard error; FID of 20 samples is about three times FID of 2,000."""
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(4000, 8))
    mu, cov = metrics.feature_stats(reference)

    def draw(n):
        return rng.normal(0.3, 1.0, size=(n, 8))
    small = [metrics.kernel_inception_distance(draw(20), reference) for _ in range(200)]
    big, big_se = metrics.kernel_inception_distance(draw(2000), reference)
    kids = np.array([kid for kid, _ in small])
    assert abs(kids.mean() - big) < 3 * np.hypot(kids.std() / np.sqrt(len(kids)), big_se)
    assert big > 5 * big_se  # the distributions differ, and KID sees it
    fid_small = np.mean([metrics.frechet_distance(*metrics.feature_stats(draw(20)), mu, cov) for _ in range(50)])
    fid_big = metrics.frechet_distance(*metrics.feature_stats(draw(2000)), mu, cov)
    assert fid_small > 2 * fid_big  # 2.1 against 0.72


def test_kid_subsets_and_standard_error():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(100, 4)), rng.normal(size=(3000, 4))
    kid, se = metrics.kernel_inception_distance(x, y)
    rng = np.random.default_rng(metrics.KID_SEED)  # the same split, by hand: 10 subsets of 10 against 10 of 300
    xs = np.array_split(x[rng.permutation(100)], 10)
    ys = np.array_split(y[rng.permutation(3000)][:3000], 10)
    each = [metrics.mmd2_unbiased(a, b) for a, b in zip(xs, ys)]
    assert kid == pytest.approx(np.mean(each)) and se == pytest.approx(np.std(each, ddof=1) / np.sqrt(10))
    assert metrics.kernel_inception_distance(x[:3], y)[1] is None  # one subset: no standard error
    with pytest.raises(NCSNError, match="KID needs at least 2 samples"):
        metrics.kernel_inception_distance(x[:1], y)


def test_nonfinite_images_are_counted_and_bad_shapes_refused():
    images = digit_images(list(range(10)) * 2)
    images[3, 0, 5, 5] = float("nan")
    images[4, 0, 0, 0] = float("inf")
    out = metrics.sample_metrics(images, FixedClassifier(), images.nan_to_num(0.5))
    assert out["nonfinite_images"] == 2 and np.isfinite(out["fid"])
    with pytest.raises(NCSNError, match=r"\(N, 1, 28, 28\).*\(20, 28, 28\)"):
        metrics.sample_metrics(images[:, 0], FixedClassifier(), images)


# ----------------------------------------------------------------------------------------------------------
# The classifier and its cache

def test_classifier_shapes_and_random_shift():
    clf = metrics.DigitClassifier()
    x = torch.rand(5, 1, 28, 28)
    assert clf(x).shape == (5, 10) and clf.features(x).shape == (5, 128)
    x = torch.zeros(200, 1, 28, 28)
    x[:, 0, 14, 14] = 1
    shifted = metrics.random_shift(x, 2, torch.Generator().manual_seed(0))
    where = shifted[:, 0].flatten(1).argmax(1)
    dy, dx = where // 28 - 14, where % 28 - 14
    assert torch.equal(shifted.flatten(1).sum(1), torch.ones(200))  # moved, not lost
    assert dy.abs().max() == 2 and dx.abs().max() == 2  # every offset within +-2 ...
    assert len(set(zip(dy.tolist(), dx.tolist()))) == 25  # ... and all 25 of them are drawn


def test_train_classifier_is_deterministic_and_leaves_the_global_rng_alone(tmp_path):
    import data as mnist

    root = write_fake_mnist(str(tmp_path), n_train=64, n_test=32)
    data = (mnist.load_mnist(root, True), mnist.load_mnist_labels(root, True),
            mnist.load_mnist(root, False), mnist.load_mnist_labels(root, False))
    rng = torch.get_rng_state()
    m1, acc1 = metrics.train_classifier(*data, seed=5, log=lambda s: None, epochs=2, batch_size=16)
    assert torch.equal(torch.get_rng_state(), rng)
    m2, acc2 = metrics.train_classifier(*data, seed=5, log=lambda s: None, epochs=2, batch_size=16)
    m3, _ = metrics.train_classifier(*data, seed=6, log=lambda s: None, epochs=2, batch_size=16)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert acc1 == acc2 and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not torch.equal(s1["hidden.weight"], s3["hidden.weight"])
    assert not m1.training and 0 <= acc1 <= 1


def test_classifier_cache_saves_loads_retrains_and_refuses_corrupt_files(tmp_path, monkeypatch, ncsn_log):
    root = write_fake_mnist(str(tmp_path / "data"), n_train=64, n_test=32)
    fallback = str(tmp_path / "fallback" / "clf.pth")
    cache = os.path.join(root, "MNIST", metrics.CACHE_NAME)
    calls = []
    real_train = metrics.train_classifier

    def counting_train(*args, **kwargs):
        calls.append(1)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(metrics, "train_classifier", counting_train)

    # 1. trained once and cached next to the data, with its accuracy and fingerprint
    m1 = metrics.get_classifier(root, "cpu", cache_path=fallback)
    assert len(calls) == 1 and os.path.isfile(cache) and not os.path.exists(fallback)
    assert not m1.training
    saved = torch.load(cache, weights_only=True)
    assert saved["fingerprint"] == metrics.classifier_fingerprint() and 0 <= saved["test_accuracy"] <= 1
    assert any("test accuracy" in m for m in ncsn_log)

    # 2. loaded back without training
    m2 = metrics.get_classifier(root, "cpu", cache_path=fallback)
    assert len(calls) == 1
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))

    # 3. other code (fingerprint) -> trained again and the cache overwritten
    monkeypatch.setattr(metrics, "classifier_fingerprint", lambda: "another architecture")
    metrics.get_classifier(root, "cpu", cache_path=fallback)
    assert len(calls) == 2
    assert torch.load(cache, weights_only=True)["fingerprint"] == "another architecture"
    assert any("different code" in m for m in ncsn_log)
    metrics.get_classifier(root, "cpu", cache_path=fallback)
    assert len(calls) == 2

    # 4. a truncated or foreign file: one-line NCSNError naming it, not a crash and not a silent retrain
    with open(cache, "rb") as f:
        data = f.read()
    with open(cache, "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(NCSNError, match="truncated") as e:
        metrics.get_classifier(root, "cpu", cache_path=fallback)
    assert cache in str(e.value) and "\n" not in str(e.value)
    torch.save({"weights": torch.zeros(3)}, cache)
    with pytest.raises(NCSNError, match="not a cache") as e:
        metrics.get_classifier(root, "cpu", cache_path=fallback)
    assert cache in str(e.value)
    assert len(calls) == 2


def test_read_only_data_folder_caches_in_the_fallback(tmp_path, monkeypatch, ncsn_log):
    root = write_fake_mnist(str(tmp_path / "data"), n_train=64, n_test=32)
    folder = os.path.join(root, "MNIST")
    fallback = str(tmp_path / "run" / "classifier" / "clf.pth")
    real_train = metrics.train_classifier
    os.chmod(folder, 0o555)  # as the shared data folder: no write bit (root would still be let in)
    try:
        before = sorted(os.listdir(folder))
        metrics.get_classifier(root, "cpu", cache_path=fallback)
        assert sorted(os.listdir(folder)) == before and os.path.isfile(fallback)
        assert any("not writable" in m and fallback in m for m in ncsn_log)
        monkeypatch.setattr(metrics, "train_classifier", lambda *a, **k: pytest.fail("retrained"))
        metrics.get_classifier(root, "cpu", cache_path=fallback)  # found in the fallback
    finally:
        os.chmod(folder, 0o755)
    # a writable data folder keeps its own classifier: the fallback of another root is not used for it
    other = write_fake_mnist(str(tmp_path / "other"), n_train=64, n_test=32, seed=1)
    monkeypatch.setattr(metrics, "train_classifier", real_train)
    metrics.get_classifier(other, "cpu", cache_path=fallback)
    assert os.path.isfile(os.path.join(other, "MNIST", metrics.CACHE_NAME))


def test_eval_on_a_tiny_run_writes_metrics_and_per_level_loss(tmp_path, monkeypatch, capsys):
    """--eval end to end: a tiny run, a classifier trained for a few steps on the fake data (the real one takes
    a minute), metrics.json and TensorBoard scalars; the same seed gives the same numbers."""
    import json

    import common
    import main
    from conftest import tiny_config, write_config, write_fake_mnist

    data = write_fake_mnist(str(tmp_path / "data"), n_train=64, n_test=32)
    monkeypatch.setitem(metrics.TRAIN_SETTINGS, "epochs", 1)
    cfg = tiny_config(data, **{"training.n_iters": 4, "training.snapshot_freq": 2, "eval.n_samples": 6,
                               "eval.every_snapshots": 1, "eval.n_training": 4})
    run = ["--run", str(tmp_path / "run"), "--doc", "e"]
    assert main.main([*CPU, "--config", write_config(tmp_path / "c.yml", cfg), *run]) == 0
    records = json.load(open(tmp_path / "run" / "logs" / "e" / "metrics.json"))
    assert [r["step"] for r in records] == [2, 4]  # during training, every snapshot
    assert main.main([*CPU, *run, "--eval"]) == 0
    assert main.main([*CPU, *run, "--eval"]) == 0
    records = json.load(open(tmp_path / "run" / "logs" / "e" / "metrics.json"))
    a, b = records[-2:]
    assert a["step"] == 4 and a["n_samples"] == 6 and len(a["test_loss_per_level"]) == 4
    assert a["fid"] == b["fid"] and a["inception_score"] == b["inception_score"]  # same seed, same numbers
    assert a["kid"] == b["kid"] and a["kid_se"] > 0 and a["weights"] == "raw"  # KID and its error, recorded
    printed = [line for line in capsys.readouterr().err.splitlines() if " samples" in line and "FID " in line]
    assert len(printed) == 4 and all("KID" in line and " +- " in line for line in printed), printed
    assert [re.search(r"(\d+) samples", line).group(1) for line in printed] == ["4", "4", "6", "6"]
    assert 1.0 <= a["inception_score"] <= 10.0 and abs(sum(a["class_shares"]) - 1) < 1e-9
    # per-level DSM loss of an untrained net is about 784/2 at every level (s ~ 0, weighted by sigma^2)
    assert all(50 < v < 2000 for v in a["test_loss_per_level"])
    scalars = common.read_scalars(tmp_path / "run" / "tensorboard" / "e")
    # each count its own tag: training's eval.n_training (4 samples), --eval's eval.n_samples (6)
    assert sorted(scalars["metrics/fid_n4"]) == [2, 4] and sorted(scalars["metrics/kid_n6"]) == [4]
    assert 4 in scalars["metrics/kid_se_n6"] and "metrics/fid" not in scalars
    assert sorted(scalars["test_loss/raw/level_0"]) == [4]  # the weights it was measured with


def test_eval_draws_the_same_count_on_every_device(tmp_path, tiny_run, monkeypatch, ncsn_log):
    """--eval's sample count and test-loss images do not depend on the device's type. The device is faked: torch's
    meta device stands in for an accelerator (it computes shapes only), and the steps of evaluate that would
    compute on it are stand-ins that record what they are asked for."""
    import json

    import evaluate
    import schema
    from conftest import TINY_DOC, copy_tiny_run
    from rundir import Run

    copy_tiny_run(tiny_run, str(tmp_path / "run"))
    asked = []  # (device type, what, count)

    def draw(score_fn, sigmas, config, n, generator, device, **kwargs):
        asked.append((torch.device(device).type, "samples", n))
        return digit_images([k % 10 for k in range(n)])

    def test_loss(score_fn, to_model, test_u8, sigmas, anneal_power, seed, **kwargs):
        asked.append((test_u8.device.type, "loss images", len(test_u8)))
        return [1.0] * 4  # tiny_config has 4 noise levels

    classifier = FixedClassifier()
    reference = metrics.reference_stats(classifier, digit_images(list(range(10)) * 4))
    monkeypatch.setattr(evaluate, "trained_network", lambda cfg, ckpt, path, device, seed, batch: (None, None))
    monkeypatch.setattr(evaluate, "sampling_generator", lambda run, device, seed: None)
    monkeypatch.setattr(evaluate, "draw_samples", draw)
    monkeypatch.setattr(evaluate, "test_loss_per_level", test_loss)
    monkeypatch.setattr(evaluate, "nearest_check", lambda *args: {})
    monkeypatch.setattr(metrics, "classifier_on_every_rank", lambda data_root, device, run: classifier)
    monkeypatch.setattr(metrics, "reference_stats", lambda classifier, images: reference)
    run = Run(str(tmp_path / "run"), TINY_DOC)
    config = schema.load_config(os.path.join(run.log_dir, "config.yml"), ["eval.n_samples=12", "eval.loss_images=20"])
    for device in ("cpu", "meta"):
        assert evaluate.evaluate(config, run, device, 1, run.ckpt_path) == 0
    assert asked == [("cpu", "samples", 12), ("cpu", "loss images", 20), ("meta", "samples", 12),
                     ("meta", "loss images", 20)]
    with open(os.path.join(run.log_dir, "metrics.json")) as f:
        records = json.load(f)
    assert [r["n_samples"] for r in records] == [12, 12] and records[0]["kid"] == records[1]["kid"]
    assert sum(line.startswith("step 6, 12 samples") and "KID" in line for line in ncsn_log) == 2


def test_white_share_counts_images_brighter_than_half():
    """A white background (mean pixel > 0.5) is what the whitening defect of short fast-path runs drew; a
    digit on black (MNIST averages 0.13) is not counted, however bright its stroke."""
    clf = metrics.DigitClassifier().eval()
    digits = torch.zeros(6, 1, 28, 28)
    digits[:, :, 8:20, 12:16] = 1.0  # a bright stroke: mean 0.06
    white = torch.full((2, 1, 28, 28), 0.9)
    white[:, :, 8:20, 12:16] = 0.0  # a dark stroke on white: mean 0.84
    grey = torch.full((2, 1, 28, 28), 0.45)  # just under the threshold
    r = metrics.sample_metrics(torch.cat([digits, white, grey]), clf, torch.rand(10, 1, 28, 28))
    assert r["white_share"] == pytest.approx(2 / 10)
