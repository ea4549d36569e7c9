"""The copy check: the nearest-neighbour search against brute force, the flag for samples nearer to a training
image than any test image comes, and --eval's nearest.png and metrics.json entry."""
import json

import pytest
import torch

import main
import metrics
from conftest import CPU, tiny_config, write_config, write_fake_mnist


def brute_force(queries, references):
    d = ((queries[:, None, :].double() - references[None, :, :].double()) ** 2).sum(-1).sqrt()  # (N, M)
    return d.min(1)


@pytest.mark.parametrize("dim,chunk", [(5, 8), (784, 16), (784, 1000)])
def test_nearest_neighbours_match_brute_force(dim, chunk):
    g = torch.Generator().manual_seed(dim + chunk)
    references = torch.rand(300, dim, generator=g)  # (M, D)
    queries = torch.rand(70, dim, generator=g)  # (N, D)
    queries[:10] = references[torch.arange(10) * 7] + 1e-3 * torch.randn(10, dim, generator=g)  # near twins
    queries[10] = references[123]  # an exact copy
    distances, indices = metrics.nearest_neighbours(queries, references, chunk=chunk)
    expected_d, expected_i = brute_force(queries, references)
    assert torch.equal(indices, expected_i)
    torch.testing.assert_close(distances, expected_d, rtol=1e-12, atol=1e-12)
    assert indices[:10].tolist() == (torch.arange(10) * 7).tolist() and distances[10] == 0


def test_samples_nearer_than_any_test_image_are_flagged():
    g = torch.Generator().manual_seed(0)
    train = (torch.rand(200, 1, 28, 28, generator=g) < 0.2).float()  # (M, 1, 28, 28) sparse binary "digits"
    test = (torch.rand(40, 1, 28, 28, generator=g) < 0.2).float()  # (T, 1, 28, 28) new draws of the same kind
    samples = (torch.rand(12, 1, 28, 28, generator=g) < 0.2).float()  # (N, 1, 28, 28)
    planted = {2: 17, 5: 150, 9: 3}  # sample -> the training image it copies, up to faint noise
    for s, t in planted.items():
        samples[s] = (train[t] + 0.01 * torch.randn(1, 28, 28, generator=g)).clamp(0, 1)
    torch.manual_seed(0)
    classifier = metrics.DigitClassifier().eval()  # untrained: any fixed feature map will do here
    summary, nearest, distance = metrics.nearest_training_images(samples, train, test, classifier)
    assert summary["copy_indices"] == sorted(planted) and summary["n_copies"] == 3
    assert [int(nearest[s]) for s in sorted(planted)] == [planted[s] for s in sorted(planted)]
    assert summary["copy_threshold"] == pytest.approx(summary["pixel_test"]["min"])
    assert summary["pixel_samples"]["min"] == pytest.approx(float(distance.min())) and distance.min() < 0.5
    assert summary["feature_samples"]["min"] < 0.1 * summary["feature_test"]["min"]  # copies: near in features too
    assert (summary["n_samples"], summary["n_train"], summary["n_test"]) == (12, 200, 40)


def test_eval_writes_the_nearest_neighbour_figures(tmp_path, capsys):
    root = write_fake_mnist(str(tmp_path / "data"))
    cfg = write_config(tmp_path / "c.yml", tiny_config(root, **{"eval.n_samples": 12, "eval.loss_images": 8}))
    run = str(tmp_path / "run")
    assert main.main([*CPU, "--config", cfg, "--run", run, "--doc", "r"]) == 0
    assert main.main([*CPU, "--config", cfg, "--run", run, "--doc", "r", "--eval"]) == 0
    logs = tmp_path / "run" / "logs" / "r"
    with open(logs / "metrics.json") as f:
        near = json.load(f)[-1]["nearest"]
    assert (near["n_samples"], near["n_train"], near["n_test"]) == (12, 64, 32)
    assert 0 < near["pixel_samples"]["min"] <= near["pixel_samples"]["median"] and near["feature_test"]["max"] > 0
    assert near["n_copies"] == len(near["copy_indices"]) and "copy_threshold" in near
    from PIL import Image
    assert Image.open(logs / "nearest.png").size == (10 * 30 + 2, 3 * 30 + 2)  # 12 samples: 12 pairs, 5 a row
    assert "nearest training image" in capsys.readouterr().err
