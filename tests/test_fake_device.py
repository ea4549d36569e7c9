"""float64 stays on the CPU: Apple's MPS has no float64 ("Cannot convert a MPS Tensor to float64 dtype"), so the
metrics (reached by --eval, the training-metrics hook and bench/quality.py) and the deterministic resize of
--deterministic must make their float64 tensors on the CPU only. Shown here without an accelerator: torch's
meta device stands in for one (ops run on shapes alone, a copy back to the CPU gives zeros of the right shape
and dtype), and every float64 tensor made off the CPU is recorded."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import metrics
import model

FAKE = torch.device("meta")


class FakeAccelerator(TorchDispatchMode):
    """Runs every op as it is, except a copy from the meta device to the CPU, which gives zeros (a meta tensor
    has no values); records (op, device) for each float64 tensor an op returns off the CPU, and counts the ops
    that return a tensor off the CPU (so a test sees that the code it checks did run on the fake device)."""

    def __init__(self):
        super().__init__()
        self.float64_off_cpu = []
        self.ops_off_cpu = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if func is torch.ops.aten._to_copy.default and src is not None and src.device == FAKE and \
                torch.device(kwargs.get("device") or FAKE).type == "cpu":
            out = torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype)
        else:
            out = func(*args, **kwargs)
        off_cpu = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.device.type != "cpu"]
        self.ops_off_cpu += bool(off_cpu)
        self.float64_off_cpu += [(str(func), t.device.type) for t in off_cpu if t.dtype == torch.float64]
        return out


def test_metrics_make_float64_on_the_cpu_only():
    """classify (FID features and softmax) and nearest_neighbours (the copy check) with the classifier and the
    images on the accelerator: their float64 arrays come back, and none was made there."""
    classifier = metrics.DigitClassifier().to(FAKE).eval()
    images = torch.rand(6, 1, 28, 28)
    with FakeAccelerator() as mode:
        feats, probs = metrics.classify(classifier, images, batch_size=4)
        stats = metrics.reference_stats(classifier, images)
        distances, indices = metrics.nearest_neighbours(images.to(FAKE), torch.rand(5, 1, 28, 28).to(FAKE))
    assert mode.ops_off_cpu > 20  # the classifier ran on the fake device ...
    assert mode.float64_off_cpu == []  # ... and no float64 was made there
    with FakeAccelerator() as mode:  # the other order of the same two steps would have been seen
        classifier.features(images[:4].to(FAKE)).double().cpu()
    assert mode.float64_off_cpu == [("aten._to_copy.default", "meta")]
    assert feats.shape == (6, 128) and probs.shape == (6, 10) and feats.dtype == probs.dtype == "float64"
    assert stats["mu"].shape == (128,) and stats["n"] == 6
    assert distances.device.type == "cpu" and distances.dtype == torch.float64 and indices.shape == (6,)


def test_deterministic_resize_makes_its_float64_on_the_cpu_only():
    """--deterministic --device mps failed on the first forward: the resize built its positions in float64 on
    the device. Now the matrices arrive in the network's dtype on its device, float64 only on the CPU."""
    h = torch.randn(2, 3, 7, 7).to(FAKE)
    torch.use_deterministic_algorithms(True)
    try:
        with FakeAccelerator() as mode:
            out = model.resize_bilinear(h, (14, 14))
            a = model.linear_interpolation_matrix(28, 14, FAKE, torch.float32)
    finally:
        torch.use_deterministic_algorithms(False)
    assert mode.ops_off_cpu > 5  # the matrices were built and used on the fake device ...
    assert mode.float64_off_cpu == []  # ... and no float64 was made there
    with FakeAccelerator() as mode:  # positions made on the device in float64 would have been seen
        torch.arange(14, dtype=torch.float64, device=FAKE)
    assert [device for _, device in mode.float64_off_cpu] == ["meta"]
    assert out.shape == (2, 3, 14, 14) and out.device == FAKE and out.dtype == torch.float32
    assert a.shape == (28, 14) and a.device == FAKE and a.dtype == torch.float32
    # and on the CPU the same matrix as before: row i interpolates at i (n_in - 1) / (n_out - 1)
    m = model.linear_interpolation_matrix(5, 3, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(m, torch.tensor([[1, 0, 0], [.5, .5, 0], [0, 1, 0], [0, .5, .5], [0, 0, 1.]]))
