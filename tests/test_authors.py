"""model.py computes exactly the authors' network: their checkpoints (written by their own code) loaded through
authors.map_state_dict reproduce their saved outputs. The ngf-4 fixture travels with the repository
(tests/fixtures/authors_ncsn_ngf4), so these tests run in any clone; the ngf-8 one is read from
../shared/fixtures/authors_ncsn where it is present (it may not be copied into the repository)."""
import os

import pytest
import torch

import authors
from common import NCSNError
from conftest import CPU, REPO
from model import CondRefineNetDilated

FIXTURES = {4: os.path.join(REPO, "tests", "fixtures", "authors_ncsn_ngf4"),
            8: os.path.join(REPO, "..", "shared", "fixtures", "authors_ncsn")}
PLAIN_TOL = 1e-5  # max abs difference to their fp32 output (their values reach about 2.3)
BF16_TOL = 0.1  # the fast path under bf16 autocast: about 8 bits of mantissa through ~60 layers

NGF = [4, pytest.param(8, marks=pytest.mark.skipif(not os.path.isdir(FIXTURES[8]), reason="the ngf-8 fixture is in "
                                                   "../shared/fixtures/authors_ncsn, which is not beside this clone"))]
NGF_IDS = ["ngf4", "ngf8"]


def their_folder(ngf):
    """Their run folder run/logs/mnist_ngf<N> (checkpoint.pth and config.yml)."""
    return os.path.join(FIXTURES[ngf], "run", "logs", f"mnist_ngf{ngf}")


def their_checkpoint(ngf=4):
    return torch.load(os.path.join(their_folder(ngf), "checkpoint.pth"), weights_only=True)


def their_io(ngf):
    return torch.load(os.path.join(FIXTURES[ngf], "io.pt"), weights_only=True)


def our_network(ngf, fast_kernels):
    net = CondRefineNetDilated(ngf=ngf, num_classes=10, channels=1, fast_kernels=fast_kernels)
    net.load_state_dict(authors.map_state_dict(their_checkpoint(ngf)[0], net.state_dict()))
    return net.eval()


@pytest.mark.parametrize("ngf", NGF, ids=NGF_IDS)
@pytest.mark.parametrize("fast_kernels", [False, True], ids=["plain", "fast-kernels"])
def test_our_network_reproduces_the_authors_output(fast_kernels, ngf):
    io = their_io(ngf)
    net = our_network(ngf, fast_kernels)
    with torch.no_grad():
        out = net(io["x"], io["labels"])  # (10, 1, 28, 28)
        assert (out - io["score"]).abs().max().item() < PLAIN_TOL
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = net(io["x"], io["labels"]).float()
    if fast_kernels:
        assert (fast - io["score"]).abs().max().item() < BF16_TOL


@pytest.mark.parametrize("ngf", NGF, ids=NGF_IDS)
def test_the_name_mapping_is_total_and_checked(ngf):
    theirs = their_checkpoint(ngf)[0]
    template = CondRefineNetDilated(ngf=ngf, num_classes=10).state_dict()
    assert len(authors.map_state_dict(theirs, template)) == len(theirs) == len(template)
    missing = dict(theirs)
    del missing["module.refine4.output_convs.3_2_conv.weight"]
    with pytest.raises(NCSNError, match=r"refine4\.out\.convs\.5\.weight is missing"):
        authors.map_state_dict(missing, template)
    extra = {**theirs, "module.refine4.extra.weight": torch.zeros(1)}
    with pytest.raises(NCSNError, match=r"module\.refine4\.extra\.weight has no counterpart"):
        authors.map_state_dict(extra, template)
    wrong = {**theirs, "module.normalizer.embed.weight": torch.zeros(10, 30)}  # 3 x ngf columns, not 30
    with pytest.raises(NCSNError, match=r"module\.normalizer\.embed\.weight has shape \(10, 30\)"):
        authors.map_state_dict(wrong, template)


# ----------------------------------------------------------------------------------------------------------
# --import_authors

def import_run(tmp_path, source, doc="a"):
    import main

    return main.main([*CPU, "--import_authors", str(source), "--run", str(tmp_path / "run"), "--doc", doc])


def their_run_copy(tmp_path, state=None, optim=None, config_text=None):
    """A copy of the ngf-4 fixture's run folder with the checkpoint's state dict or the config replaced."""
    src = their_folder(4)
    dst = tmp_path / "theirs"
    dst.mkdir()
    ckpt = their_checkpoint()
    torch.save([state if state is not None else ckpt[0], optim if optim is not None else ckpt[1]],
               dst / "checkpoint.pth")
    with open(os.path.join(src, "config.yml")) as f:
        text = f.read()
    (dst / "config.yml").write_text(config_text if config_text is not None else text)
    return dst


@pytest.mark.parametrize("ngf", NGF, ids=NGF_IDS)
def test_import_then_sample_and_the_weights_and_adam_state_are_theirs(tmp_path, fake_mnist, ngf):
    import main
    from conftest import tiny_config, write_config

    assert import_run(tmp_path, their_folder(ngf)) == 0
    ours = torch.load(tmp_path / "run" / "logs" / "a" / "checkpoint.pth", weights_only=True)
    assert ours["step"] == 0 and ours["config"]["model"]["ngf"] == ngf and \
        ours["config"]["sampling"]["step_lr"] == 2e-5
    net = CondRefineNetDilated(ngf=ngf, num_classes=10, fast_kernels=False)
    net.load_state_dict(ours["model"])
    io = their_io(ngf)
    with torch.no_grad():
        assert (net.eval()(io["x"], io["labels"]) - io["score"]).abs().max().item() < PLAIN_TOL
    theirs = their_checkpoint(ngf)
    their_index = list(theirs[0]).index("module.refine4.output_convs.3_2_conv.weight")
    our_index = [n for n, _ in net.named_parameters()].index("refine4.out.convs.5.weight")
    assert torch.equal(ours["optimizer"]["state"][our_index]["exp_avg"], theirs[1]["state"][their_index]["exp_avg"])
    small = write_config(tmp_path / "s.yml", tiny_config(fake_mnist, **{"sampling.n_steps_each": 2}))
    assert main.main([*CPU, "--run", str(tmp_path / "run"), "--doc", "a", "--sample", "--config", small, "-o",
                      str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "samples.png").exists()


def assert_refused(tmp_path, capsys, source, message):
    capsys.readouterr()
    assert import_run(tmp_path, source) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "ERROR" in line]
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()  # nothing written


def test_import_refuses_a_doctored_checkpoint(tmp_path, capsys):
    state = dict(their_checkpoint()[0])
    del state["module.res2.0.shortcut.conv.bias"]
    assert_refused(tmp_path, capsys, their_run_copy(tmp_path, state=state),
                   "model.py's parameter res2.0.shortcut.conv.bias is missing")


def test_import_refuses_a_cifar10_model(tmp_path, capsys):
    state = {"module.begin_conv.weight": torch.zeros(128, 3, 3, 3),
             "module.normalizer.embed.weight": torch.zeros(10, 384)}
    text = (open(os.path.join(their_folder(4), "config.yml")).read()
            .replace("channels: 1", "channels: 3").replace("dataset: MNIST", "dataset: CIFAR10")
            .replace("image_size: 28", "image_size: 32").replace("ngf: 4", "ngf: 128"))
    assert_refused(tmp_path, capsys, their_run_copy(tmp_path, state=state, config_text=text),
                   "is a CIFAR10 model (3 channels, 32 pixels, ngf 128): this repository runs MNIST only")


def test_import_refuses_a_config_that_contradicts_the_tensors(tmp_path, capsys):
    text = open(os.path.join(their_folder(4), "config.yml")).read().replace("ngf: 4", "ngf: 16")
    assert_refused(tmp_path, capsys, their_run_copy(tmp_path, config_text=text),
                   "its config says model.ngf = 16, its tensors say 4")


def test_import_never_executes_yaml_tags(tmp_path, capsys):
    marker = tmp_path / "executed"
    text = f"!!python/object/apply:os.system ['touch {marker}']\n"
    assert_refused(tmp_path, capsys, their_run_copy(tmp_path, config_text=text), "cannot read the authors' config")
    assert not marker.exists()


def test_import_refuses_other_files(tmp_path, capsys):
    ours = tmp_path / "ours.pth"
    torch.save({"format": 1, "model": {}}, ours)
    assert_refused(tmp_path, capsys, ours, "is a checkpoint of this repository, not of the authors' code")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    assert_refused(tmp_path, capsys, junk, "is not readable as a checkpoint")
