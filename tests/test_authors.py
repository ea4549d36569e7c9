"""model.py computes exactly the authors' network: their ngf-8 checkpoint (../shared/fixtures/authors_ncsn,
written by their own code) loaded through authors.map_state_dict reproduces their saved output."""
import os

import pytest
import torch

import authors
from common import NCSNError
from conftest import REPO
from model import CondRefineNetDilated

FIXTURE = os.path.join(REPO, "..", "shared", "fixtures", "authors_ncsn")
PLAIN_TOL = 1e-5  # max abs difference to their fp32 output (their values reach about 2.3)
BF16_TOL = 0.1  # the fast path under bf16 autocast: about 8 bits of mantissa through ~60 layers

needs_fixture = pytest.mark.skipif(not os.path.isdir(FIXTURE), reason="the shared fixtures are not beside the repo")


def their_checkpoint():
    return torch.load(os.path.join(FIXTURE, "run", "logs", "mnist_ngf8", "checkpoint.pth"), weights_only=True)


def our_network(fast_kernels):
    net = CondRefineNetDilated(ngf=8, num_classes=10, channels=1, fast_kernels=fast_kernels)
    net.load_state_dict(authors.map_state_dict(their_checkpoint()[0], net.state_dict()))
    return net.eval()


@needs_fixture
@pytest.mark.parametrize("fast_kernels", [False, True], ids=["plain", "fast-kernels"])
def test_our_network_reproduces_the_authors_output(fast_kernels):
    io = torch.load(os.path.join(FIXTURE, "io.pt"), weights_only=True)
    net = our_network(fast_kernels)
    with torch.no_grad():
        out = net(io["x"], io["labels"])  # (10, 1, 28, 28)
        assert (out - io["score"]).abs().max().item() < PLAIN_TOL
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = net(io["x"], io["labels"]).float()
    if fast_kernels:
        assert (fast - io["score"]).abs().max().item() < BF16_TOL


@needs_fixture
def test_the_name_mapping_is_total_and_checked():
    theirs = their_checkpoint()[0]
    template = CondRefineNetDilated(ngf=8, num_classes=10).state_dict()
    assert len(authors.map_state_dict(theirs, template)) == len(theirs) == len(template)
    missing = dict(theirs)
    del missing["module.refine4.output_convs.3_2_conv.weight"]
    with pytest.raises(NCSNError, match=r"refine4\.out\.convs\.5\.weight is missing"):
        authors.map_state_dict(missing, template)
    extra = {**theirs, "module.refine4.extra.weight": torch.zeros(1)}
    with pytest.raises(NCSNError, match=r"module\.refine4\.extra\.weight has no counterpart"):
        authors.map_state_dict(extra, template)
    wrong = {**theirs, "module.normalizer.embed.weight": torch.zeros(10, 30)}
    with pytest.raises(NCSNError, match=r"module\.normalizer\.embed\.weight has shape \(10, 30\)"):
        authors.map_state_dict(wrong, template)
