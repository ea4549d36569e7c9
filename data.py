"""MNIST for NCSN: the IDX files through torchvision, uniform dequantization, the data space, the randomness of
one training step and the order of the batches (`EpochOrder`). Its own module so that training, evaluation, the
metrics classifier and the benchmarks read the data through one piece of code."""
import logging
import math
import os

import torch

from common import NCSNError, derive_seed

log = logging.getLogger("ncsn")

MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte"]
LOGIT_LAMBDA = 1e-6  # logit_transform keeps pixels in [lam, 1 - lam]
MNIST_MEAN = 0.1307  # the mean pixel of the 60,000 training digits in [0, 1]


IDX_ERRORS = (AssertionError, ValueError, TypeError, IndexError, KeyError, EOFError, RuntimeError)  # what
# torchvision's IDX reader raises for a file whose header or length is wrong


def _mnist(root, train, download):
    """torchvision's MNIST dataset from <root>/MNIST/raw, downloading only missing files; one-line errors naming
    the file at fault."""
    import torchvision  # slow to import; only the paths that read data need it

    raw = os.path.join(root, "MNIST", "raw")
    missing = [f for f in MNIST_FILES if not os.path.isfile(os.path.join(raw, f))]
    if missing and download:
        log.info("MNIST not found in %s: downloading it", raw)
    try:
        dataset = torchvision.datasets.MNIST(root, train=train, download=bool(missing) and download)
    except (RuntimeError, OSError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if any(not os.path.isfile(os.path.join(raw, f)) for f in MNIST_FILES):
            raise NCSNError(f"MNIST is missing from {raw} and could not be downloaded ({why.rstrip(':')}); "
                            f"offline, put the four files {', '.join(MNIST_FILES)} there") from e
        raise damaged_mnist(raw, train, why) from e
    except IDX_ERRORS as e:
        raise damaged_mnist(raw, train, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from e
    labels = MNIST_FILES[1] if train else MNIST_FILES[3]
    if len(dataset.targets) != len(dataset.data):
        raise damaged_mnist(raw, train, f"{len(dataset.data)} images but {len(dataset.targets)} labels", labels)
    if len(dataset.targets) and not 0 <= int(dataset.targets.min()) <= int(dataset.targets.max()) <= 9:
        raise damaged_mnist(raw, train, f"a label outside 0..9: {int(dataset.targets.max())}", labels)
    return dataset


def damaged_mnist(raw, train, why, name=None):
    """The one-line NCSNError of a damaged MNIST file of the split in the folder `raw`: the file `name`, or the
    first of the split's two files that torchvision's IDX reader refuses on its own (else the folder)."""
    from torchvision.datasets import mnist

    if name is None:
        images, labels = MNIST_FILES[:2] if train else MNIST_FILES[2:]
        for name, read in ((images, mnist.read_image_file), (labels, mnist.read_label_file)):
            try:
                read(os.path.join(raw, name))
            except IDX_ERRORS as e:
                why = f"{type(e).__name__}: {e}" if str(e) else "its IDX header does not match its length"
                break
        else:
            name = None
    where = os.path.join(raw, name) if name else f"an MNIST file in {raw}"
    return NCSNError(f"{where} is truncated or corrupt ({why}); delete it to download it again, or copy it afresh")


def load_mnist(root, train, download=True):
    """MNIST images as one uint8 tensor (N, 28, 28), read by torchvision from <root>/MNIST/raw."""
    data = _mnist(root, train, download).data
    if data.dtype != torch.uint8 or data.dim() != 3 or tuple(data.shape[1:]) != (28, 28) or len(data) == 0:
        raw = os.path.join(root, "MNIST", "raw")
        raise NCSNError(f"MNIST in {raw} has images of shape {tuple(data.shape)}, expected (N, 28, 28) uint8")
    return data  # (N, 28, 28) uint8


def load_mnist_labels(root, train):
    """MNIST labels (N,) int64, read by torchvision from <root>/MNIST/raw (the files must be there)."""
    return _mnist(root, train, download=False).targets.long()  # (N,)


def dequantize(x_u8, generator=None, u=None):
    """Uniform dequantization: x = (255 x + u) / 256 with x in [0, 1], u ~ U[0, 1) (i.e. (k + u) / 256);
    u is drawn from `generator` unless given."""
    x = x_u8.unsqueeze(1).float()  # (B, 1, 28, 28)
    if u is None:
        u = torch.rand(x.shape, generator=generator, device=x.device)
    return (x + u) / 256.0


def logit_transform(x, lam=LOGIT_LAMBDA):
    """Map [0, 1] to the real line: logit(lam + (1 - 2 lam) x)."""
    x = lam + (1 - 2 * lam) * x
    return torch.log(x) - torch.log1p(-x)


def data_space(config):
    """(to_model, to_image): pixels in [0, 1] to the space the model works in, and back."""
    if config.data.logit_transform:
        return logit_transform, torch.sigmoid
    return (lambda x: x), (lambda x: x)


def stratified_levels(generator, batch, num_levels, device):
    """Levels (B,) in which each of the L levels appears batch // L times and batch % L levels, chosen at random,
    once more; in a random order. Two draws from `generator`: the levels of the remainder, then the order."""
    extra = torch.randperm(num_levels, generator=generator, device=device)[: batch % num_levels]
    levels = torch.cat([torch.arange(num_levels, device=device).repeat(batch // num_levels), extra])
    return levels[torch.randperm(batch, generator=generator, device=device)]


def dsm_noise(generator, shape, num_levels, device, labels=None, z=None, stratified=False, dtype=None):
    """The noise of denoising score matching for a batch of `shape` (B, 1, 28, 28): the levels (B,) and
    z ~ N(0, I) of that shape, each drawn from `generator` (in that order) unless given. The levels are
    i ~ U{0..L-1} for each image (the paper), or with `stratified` (training.stratified_levels) the same share
    of the batch for every level (stratified_levels). Returns (labels, z)."""
    if labels is None:
        labels = stratified_levels(generator, shape[0], num_levels, device) if stratified else \
            torch.randint(num_levels, (shape[0],), generator=generator, device=device)  # (B,)
    if z is None:
        z = torch.randn(shape, generator=generator, device=device, dtype=dtype)  # (B, 1, 28, 28)
    return labels, z


def batch_noise(generator, batch, num_levels, device, shape=(1, 28, 28), stratified=False):
    """The randomness of one training step, in the order a single process draws it: the dequantization
    noise u ~ U[0, 1) (B, 1, 28, 28), then the levels (B,) and z (B, 1, 28, 28) of dsm_noise. Callers draw the
    whole global batch on every rank."""
    u = torch.rand((batch, *shape), generator=generator, device=device)
    labels, z = dsm_noise(generator, (batch, *shape), num_levels, device, stratified=stratified)
    return u, labels, z


def epoch_permutation(seed, epoch, n):
    """The order of the training set in `epoch`: a function of (seed, epoch) only, so resume needs no state."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "epoch_order", epoch)))


class EpochOrder:
    """The global batch of each step: epoch e visits the training set in the order epoch_permutation(seed, e), a
    function of (seed, epoch) only, so a resume needs no state."""

    def __init__(self, seed, n, batch_size, device):
        self.seed, self.n, self.batch_size, self.device = seed, n, batch_size, device
        self.steps_per_epoch = math.ceil(n / batch_size)
        self.epoch, self.perm = None, None

    def batch(self, step):
        """The indices (B,) of the global batch of step `step` + 1 (the next one)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            self.epoch, self.perm = epoch, epoch_permutation(self.seed, epoch, self.n).to(self.device)
        return self.perm[i * self.batch_size:(i + 1) * self.batch_size]
