"""The score network: exact parameter counts of the paper's MNIST model, CIN++ against its definition."""
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, graph_counter
from model import CondInstanceNormPlus, CondRefineNetDilated, fast_elu_fn


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_count_matches_the_authors_mnist_model():
    net = CondRefineNetDilated(ngf=64, num_classes=10, channels=1)
    assert n_params(net) == 7_638_657
    parts = {"begin_conv": 640, "res1": 155_392, "res2": 425_792, "res3": 753_280, "res4": 753_280,
             "refine1": 1_210_368, "refine2": 2_118_400, "refine3": 1_520_768, "refine4": 698_240,
             "end_norm": 1_920, "end_conv": 577}
    assert {name: n_params(getattr(net, name)) for name in parts} == parts
    # a few inner parts of the table in the architecture description
    assert n_params(net.res2[0].shortcut) == 8_320
    assert n_params(net.res3[0].shortcut) == 147_584
    assert n_params(net.refine2.msf) == 302_848
    assert n_params(net.refine4.out) == 232_704


def test_shapes_through_the_network():
    torch.manual_seed(0)
    net = CondRefineNetDilated(ngf=8, num_classes=5)
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([0, 2, 4])
    out = net(x, y)
    assert out.shape == (3, 1, 28, 28) and torch.isfinite(out).all()
    # the level index matters: the same image at another level gives another score
    assert not torch.allclose(net(x, torch.tensor([1, 2, 4])), out)


def reference_cin_plus(x, y, embed, eps=1e-5):
    """CIN++ written literally: InstanceNorm(x) + alpha * (mu - m) / sqrt(v + eps), then gamma * h + beta."""
    gamma, alpha, beta = embed[y].chunk(3, dim=-1)
    mu = x.mean(dim=(2, 3))
    m, v = mu.mean(dim=-1, keepdim=True), mu.var(dim=-1, keepdim=True)
    h = F.instance_norm(x, eps=eps) + alpha[..., None, None] * ((mu - m) / torch.sqrt(v + eps))[..., None, None]
    return gamma[..., None, None] * h + beta[..., None, None]


def forbid(monkeypatch, module, name, when=lambda *args, **kwargs: True):
    """module.name raises when called (with arguments for which `when` holds): a test that sets a fast switch
    shows that the slow kernel it replaces is not what ran."""
    real = getattr(module, name)

    def forbidden(*args, **kwargs):
        if when(*args, **kwargs):
            raise AssertionError(f"{name} ran: the fast path was not taken")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, forbidden)


def is_5x5(x, kernel_size, *args, **kwargs):  # CRP's pooling; ConvMeanPool's 2x2 mean stays avg_pool2d
    return kernel_size == 5


@pytest.mark.parametrize("fast", [False, True])
def test_cin_plus_equals_its_definition(fast, monkeypatch):
    if fast:  # the statistics come from E[x] and E[x^2], not var_mean
        forbid(monkeypatch, torch, "var_mean")
    torch.manual_seed(0)
    norm = CondInstanceNormPlus(16, num_classes=4)
    norm.fast = fast
    with torch.no_grad():
        norm.embed.weight.normal_()  # not the initial (1, 1, 0) rows: every term must count
    x = torch.randn(5, 16, 7, 7, dtype=torch.float64) * 3 + torch.randn(5, 16, 1, 1, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1])
    norm = norm.double()
    tol = 1e-5 if fast else 1e-10  # the fast statistics accumulate in fp32
    torch.testing.assert_close(norm(x, y), reference_cin_plus(x, y, norm.embed.weight), rtol=tol, atol=tol)


def test_cin_plus_initialisation():
    torch.manual_seed(0)
    w = CondInstanceNormPlus(64, num_classes=10).embed.weight
    assert w.shape == (10, 192)
    assert w[:, :128].mean().item() == pytest.approx(1.0, abs=0.01)
    assert w[:, :128].std().item() == pytest.approx(0.02, rel=0.15)
    assert (w[:, 128:] == 0).all()


def test_fast_elu_equals_elu_with_its_gradient():
    x = (torch.randn(4000, dtype=torch.float64) * 4).requires_grad_()
    torch.testing.assert_close(fast_elu_fn(x), F.elu(x), rtol=0, atol=1e-14)
    assert torch.autograd.gradcheck(fast_elu_fn, (torch.randn(64, dtype=torch.float64, requires_grad=True),))
    g = torch.randn_like(x)
    (a,) = torch.autograd.grad(fast_elu_fn(x), x, g)
    (b,) = torch.autograd.grad(F.elu(x), x, g)
    torch.testing.assert_close(a, b)


def test_crp_fast_pooling_is_the_5x5_average_pool(monkeypatch):
    from model import CondCRP
    crp = CondCRP(6, num_classes=3, act=F.elu)
    x = torch.randn(2, 6, 9, 9)
    crp.fast = True
    with monkeypatch.context() as m:
        forbid(m, F, "avg_pool2d", is_5x5)
        fast = crp.pool(x)
    torch.testing.assert_close(fast, F.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=True))


def test_network_with_fast_kernels_equals_the_plain_one(monkeypatch):
    torch.manual_seed(0)
    plain = CondRefineNetDilated(ngf=8, num_classes=4, fast_kernels=False)
    fast = CondRefineNetDilated(ngf=8, num_classes=4, fast_kernels=True)
    fast.load_state_dict(plain.state_dict())
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([0, 3])
    expected = plain(x, y)
    # the fast network runs none of the three kernels it replaces: ELU, var_mean, the 5x5 avg_pool2d
    forbid(monkeypatch, F, "elu")
    forbid(monkeypatch, torch, "var_mean")
    forbid(monkeypatch, F, "avg_pool2d", is_5x5)
    torch.testing.assert_close(fast(x, y), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fast_kernels", [True, False], ids=["fast-kernels", "plain-kernels"])
def test_bf16_autocast_output_is_close_to_fp32(fast_kernels):
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-9) and the roundings add up through the network: here
    # the output drifts by about 2 % of its norm (fast kernels; 1.7 % plain), and must stay within 5 % at every
    # level, sigma_L's included (the input and the score stay fp32)
    torch.manual_seed(0)
    net = CondRefineNetDilated(ngf=8, num_classes=4, fast_kernels=fast_kernels)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, CondInstanceNormPlus):
                m.embed.weight.normal_(1, 0.3)  # levels that differ, as after training
    sigmas = torch.tensor([1.0, 0.2154, 0.0464, 0.01])
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    x = torch.zeros(8, 1, 28, 28)  # MNIST-like: a flat black background and a bright stroke, then the noise
    x[:, :, 6:22, 12:16] = 0.9
    x = x + sigmas[y].view(-1, 1, 1, 1) * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    # the dtypes of the inner convolutions' outputs under autocast: bf16, or autocast did nothing (the first
    # and the last convolution stay fp32 on purpose: the input and the score)
    inner = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m not in (net.begin_conv, net.end_conv)]
    dtypes = set()
    hooks = [m.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype)) for m in inner]
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x, y)
        for h in hooks:
            h.remove()
        ref = net(x, y)
    assert dtypes == {torch.bfloat16}, f"the inner convolutions ran in {dtypes} under bf16 autocast"
    assert low.dtype == torch.float32
    err = ((low - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).max().item()
    # and the output did go through bf16: a few % of drift, not the 0 of an fp32 forward
    assert 0.002 < err < 0.05, f"bf16 differs from fp32 by {err:.3%} of the output norm"


def test_crp_fast_pooling_is_unbiased_under_bf16(monkeypatch):
    from model import CondCRP
    crp = CondCRP(6, num_classes=3, act=F.elu)
    crp.fast = True
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 6, 32, 32, generator=g) + 0.5  # positive: a bias in the weights cannot average out
    with monkeypatch.context() as m, torch.autocast("cpu", dtype=torch.bfloat16):
        forbid(m, F, "avg_pool2d", is_5x5)  # (which autocast would run in fp32, unbiased whatever happens)
        fast = crp.pool(x)
    assert fast.dtype == torch.bfloat16  # pooled in bf16, where a 1/25 kernel would be biased
    ref = F.avg_pool2d(x.float(), 5, stride=1, padding=2)
    ratio = (fast.float() / ref).mean().item()
    # bf16 rounds each output by up to 2^-9 relative, with no preferred sign: the mean over 24,576 outputs
    # must sit on 1 (the 1/25 weight in bf16, 0.0400390625, would put it at 1.00098)
    assert abs(ratio - 1) < 2e-4, f"mean ratio of bf16 pooling to the fp32 average: {ratio:.6f}"
    # and in fp32 the fast pooling stays the average pool
    torch.testing.assert_close(crp.pool(x), ref, rtol=0, atol=1e-6)


def test_cin_plus_elu_is_cin_plus_then_elu_with_its_gradients():
    """model.cin_plus_elu, the one-graph form that fast.compile_norms compiles, against CIN++ written literally."""
    from model import cin_plus_elu
    torch.manual_seed(0)
    w = torch.randn(4, 3 * 6, dtype=torch.float64, requires_grad=True)  # (L, 3C): not the initial rows
    x = (torch.randn(5, 6, 7, 7, dtype=torch.float64) * 3 + torch.randn(5, 6, 1, 1, dtype=torch.float64))
    x.requires_grad_()
    y = torch.tensor([0, 1, 2, 3, 1])
    g = torch.randn(5, 6, 7, 7, dtype=torch.float64)
    for elu in (False, True):
        ours = cin_plus_elu(x, y, w, 1e-5, elu)
        ref = reference_cin_plus(x, y, w)
        ref = F.elu(ref) if elu else ref
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
        for a, b in zip(torch.autograd.grad(ours, (x, w), g), torch.autograd.grad(ref, (x, w), g)):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_compile_norms_keeps_the_function_and_the_state_dict(channels_last):
    """compile_norms routes every CIN++ (and the ELU after it) through one compiled function: the same outputs
    and parameter gradients as the eager network, the same state_dict keys, and the graphs are really used."""
    torch.manual_seed(0)
    mf = torch.channels_last if channels_last else torch.contiguous_format
    eager = CondRefineNetDilated(ngf=4, num_classes=4).to(memory_format=mf)
    fused = CondRefineNetDilated(ngf=4, num_classes=4).to(memory_format=mf)
    fused.load_state_dict(eager.state_dict())
    backend, graphs = graph_counter()
    try:
        fused.compile_norms(backend=backend, dynamic=False)
        assert list(fused.state_dict()) == list(eager.state_dict())
        x = torch.rand(3, 1, 28, 28).contiguous(memory_format=mf)
        y = torch.tensor([0, 3, 1])
        outs = [net(x, y) for net in (eager, fused)]
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
        # 4 CIN++ shapes (4 x 28^2, 8 x 14^2, 4 x 14^2 and 8 x 14^2 without ELU...), each with and without ELU
        assert len(graphs) >= 4
        for out in outs:
            (out ** 2).sum().backward()
        for (name, a), b in zip(eager.named_parameters(), fused.parameters()):  # fp32 sums in another order
            err = ((b.grad - a.grad).norm() / a.grad.norm()).item()
            assert err < 1e-4, f"{name}: the gradient differs by {err:.2g} of its norm"
        with torch.inference_mode():  # as the sampler calls it
            torch.testing.assert_close(fused(x, y), eager(x, y), rtol=1e-4, atol=1e-5)
        n = len(graphs)
        # another batch size (the short last batch of an epoch) runs eagerly: the same values, nothing compiled
        torch.testing.assert_close(fused(x[:2], y[:2]), eager(x[:2], y[:2]), rtol=1e-4, atol=1e-5)
        assert len(graphs) == n
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_cin_plus_elu_under_inductor_equals_eager(channels_last):
    """The inductor kernels of cin_plus_elu (forward and backward, a tiny shape) compute the eager function, in
    both layouts (configs/quick.yml compiles it channels-last; its own test there uses dynamo's eager backend)."""
    from model import cin_plus_elu
    torch.manual_seed(0)
    w = torch.randn(3, 12, requires_grad=True)
    x = torch.randn(2, 4, 5, 5) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = torch.tensor([2, 0])
    try:
        compiled = torch.compile(cin_plus_elu, dynamic=False)
        out = compiled(x, y, w, 1e-5, True)
        ref = cin_plus_elu(x, y, w, 1e-5, True)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        g = torch.randn_like(ref)
        for a, b in zip(torch.autograd.grad(out, (x, w), g), torch.autograd.grad(ref, (x, w), g)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    finally:
        torch._dynamo.reset()


def test_cin_plus_docstring_states_the_formula_the_code_computes():
    """The formula under "What the code computes" in CondInstanceNormPlus's docstring, evaluated as written, is the
    module's output; the paper's eq. 17 that it quotes beside it is not (alpha sits outside gamma there). design.md
    lists the difference among the departures."""
    doc = CondInstanceNormPlus.__doc__
    ours = doc.split("What the code computes:")[1].strip().splitlines()[0]
    paper = doc.split("eq. 17 adds alpha outside gamma:")[1].strip().splitlines()[0]
    torch.manual_seed(0)
    norm = CondInstanceNormPlus(6, num_classes=3).double()
    with torch.no_grad():
        norm.embed.weight.normal_()
    x, y = torch.randn(2, 6, 5, 5, dtype=torch.float64) + torch.randn(2, 6, 1, 1, dtype=torch.float64), [2, 0]
    out = norm(x, torch.tensor(y))
    gamma, alpha, beta = norm.embed.weight.detach().chunk(3, dim=-1)  # (classes, C) each: gamma[y, k]
    for b in range(2):
        mu = x[b].mean(dim=(1, 2), keepdim=True)  # (C, 1, 1)
        names = {"gamma": gamma, "alpha": alpha, "beta": beta, "y": y[b], "k": torch.arange(6).view(6, 1, 1),
                 "x_k": x[b], "mu_k": mu, "sigma_k": torch.sqrt(x[b].var(dim=(1, 2), correction=0, keepdim=True)
                                                                  + 1e-5),
                 "m": mu.mean(), "s": torch.sqrt(mu.var() + 1e-5)}
        torch.testing.assert_close(eval(ours.split("=", 1)[1], names), out[b], rtol=1e-10, atol=1e-10)
        assert not torch.allclose(eval(paper.split("=", 1)[1], names), out[b])
    with open(os.path.join(REPO, "docs", "design.md")) as f:
        design = f.read()
    assert "z_k = gamma_k ((x_k - mu_k) / sigma_k + alpha_k (mu_k - m)\n  / s) + beta_k" in design
