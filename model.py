"""The NCSN score network for MNIST: a conditional RefineNet with dilated convolutions.

Song & Ermon (2019), "Generative Modeling by Estimating Gradients of the Data Distribution", section 4.2
and appendix B.1 (the authors call the class CondRefineNetDilated). `tests/test_model.py` checks the parameter
count of every part (7,638,657 in all at ngf 64 and 10 noise levels); `tests/test_authors.py` loads a checkpoint
written by the authors' own code (through authors.py's name mapping) and reproduces its output within 1e-5 (the
test's bound; docs/results.md#what-it-is-not), which pins the wiring: the order of norm and activation, every skip
connection, the pooling and the upsampling.

Every normalisation is conditional on the noise level index y (B,) through CIN++ (appendix B.1):
for each level an embedding row holds (gamma, alpha, beta).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class _FastELU(torch.autograd.Function):
    """ELU(x) = x for x > 0, exp(x) - 1 otherwise, computed as relu(x) + exp(min(x, 0)) - 1.

    Same values as F.elu (to rounding), but built from vectorised kernels: on the CPU profiled F.elu ran about 4x
    slower than an exp pass (its expm1 is not vectorised; docs/results.md#plain-against-fast-path).
    exp(min(x, 0)) is also the derivative everywhere, so it is the only tensor kept for backward, as F.elu keeps one.
    """

    @staticmethod
    def forward(ctx, x):
        r = torch.relu(x)
        e = torch.exp(x - r)  # exp(min(x, 0)) = dELU/dx
        ctx.save_for_backward(e)
        return (e + r).sub_(1)

    @staticmethod
    def backward(ctx, grad):
        (e,) = ctx.saved_tensors
        return grad * e


def fast_elu_fn(x):
    return _FastELU.apply(x)


def cin_plus_elu(x, y, weight, eps, elu):
    """CIN++ of x (B, C, H, W) at levels y (B,) with the embedding `weight` (L, 3C), then ELU when `elu`: the same
    function as CondInstanceNormPlus (and the ELU after it) written as one graph for torch.compile, which fuses it
    into a statistics pass and an output pass (forward and backward). fp32 only."""
    gamma, alpha, beta = F.embedding(y, weight).chunk(3, dim=-1)  # each (B, C)
    var, mu = torch.var_mean(x, dim=(2, 3), correction=0)  # (B, C)
    m = mu.mean(dim=-1, keepdim=True)  # (B, 1)
    v = mu.var(dim=-1, keepdim=True)  # (B, 1), unbiased
    mu_hat = (mu - m) * torch.rsqrt(v + eps)
    inv_std = torch.rsqrt(var + eps)
    scale = gamma * inv_std
    shift = beta + gamma * (alpha * mu_hat - mu * inv_std)
    out = x * scale[..., None, None] + shift[..., None, None]
    # ELU as _FastELU computes it: inductor's CPU expm1 is scalar code, 30x slower here than its exp
    return torch.relu(out) + torch.exp(out.clamp(max=0)) - 1 if elu else out


class CondInstanceNormPlus(nn.Module):
    """Conditional instance normalization++ (appendix B.1 of the paper), in the authors' code's parametrisation.

    mu_k: spatial mean of channel k; m, s^2: mean and unbiased variance of the mu_k over channels; sigma_k the
    (biased) spatial std of channel k; both std's with eps 1e-5 inside the root. What the code computes:
        z_k = gamma[y, k] * ((x_k - mu_k) / sigma_k + alpha[y, k] * (mu_k - m) / s) + beta[y, k]
    as the authors' ConditionalInstanceNorm2dPlus does (h = InstanceNorm(x) + alpha * mu_hat; gamma * h + beta),
    so their checkpoints load. The paper's eq. 17 adds alpha outside gamma:
        z_k = gamma[y, k] * (x_k - mu_k) / sigma_k + beta[y, k] + alpha[y, k] * (mu_k - m) / s
    The same functions (eq. 17's alpha is gamma * alpha here, where gamma is not 0), other parameters: with gamma
    and alpha both initialised at N(1, 0.02) and beta at 0, the effective alpha starts as their product, and a step
    on gamma moves the mean term too (docs/design.md#the-method-as-implemented). tests/test_model.py checks the
    code against the first formula written out.
    The whole thing is one per-channel affine map of x, so it is computed as x * a + b: one pass for the
    statistics, one for the output (the same result as InstanceNorm2d followed by the scaling).
    """

    def __init__(self, num_features, num_classes, eps=1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.fast = False  # statistics from E[x] and E[x^2] in fp32 (6x faster on CPU than var_mean)
        self.fused = None  # cin_plus_elu under torch.compile (CondRefineNetDilated.compile_norms)
        self.embed = nn.Embedding(num_classes, 3 * num_features)  # rows: (gamma | alpha | beta)
        self.embed.weight.data[:, : 2 * num_features].normal_(1, 0.02)
        self.embed.weight.data[:, 2 * num_features:].zero_()

    def forward(self, x, y, act=None):  # x (B, C, H, W), y (B,) long; act: the activation after it, if any
        if self.fused is not None and x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type):
            return self.fused(x, y, self.embed.weight, self.eps, act is not None)
        out = self.norm(x, y)
        return out if act is None else act(out)

    def norm(self, x, y):
        gamma, alpha, beta = self.embed(y).chunk(3, dim=-1)  # each (B, C)
        # Statistics and the affine map in fp32 even under bf16 autocast (which keeps its own normalisations in
        # fp32 for the same reason): x * a + b with a = gamma / sigma_k, b ~ -mu_k a cancels mu_k. In bf16,
        # for a channel whose mean is large against its spread, that rounds the spread away, with the same
        # error at every pixel of a flat region such as MNIST's background.
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        if self.fast:
            mu = xf.mean(dim=(2, 3))  # (B, C)
            var = (xf * xf).mean(dim=(2, 3)).sub_(mu * mu).clamp_min_(0)  # (B, C)
        else:
            var, mu = torch.var_mean(xf, dim=(2, 3), correction=0)  # (B, C) spatial stats
        m = mu.mean(dim=-1, keepdim=True)  # (B, 1)
        v = mu.var(dim=-1, keepdim=True)  # (B, 1), unbiased as in the authors' code
        mu_hat = (mu - m) / torch.sqrt(v + self.eps)  # (B, C)
        inv_std = torch.rsqrt(var + self.eps)  # (B, C)
        scale = gamma * inv_std  # (B, C)
        shift = beta + gamma * (alpha * mu_hat - mu * inv_std)  # (B, C)
        out = torch.addcmul(shift[..., None, None], xf, scale[..., None, None])  # (B, C, H, W) fp32
        if self.fast and torch.is_autocast_enabled(x.device.type):
            # the next convolution takes it in the autocast dtype anyway: cast here, so that the ELU between
            # runs and keeps its saved tensor in bf16 too (less memory, no later cast)
            return out.to(torch.get_autocast_dtype(x.device.type))
        return out.to(x.dtype)


def conv3x3(c_in, c_out, bias=True, dilation=1):
    return nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation, bias=bias)


class ConvMeanPool(nn.Module):
    """A convolution followed by 2x2 mean pooling (halves H and W)."""

    def __init__(self, c_in, c_out, kernel_size):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2)

    def forward(self, x):
        return F.avg_pool2d(self.conv(x), 2)


class CondResBlock(nn.Module):
    """Pre-activation residual block: CIN++ -> ELU -> conv1 -> CIN++ -> ELU -> conv2, plus a shortcut.

    down=True with no dilation halves the resolution; down=True with a dilation keeps it (the authors'
    quirk, kept on purpose) but still adds a 3x3 dilated convolution as the shortcut.
    """

    def __init__(self, c_in, c_out, num_classes, act, down=False, dilation=None):
        super().__init__()
        self.act = act
        d = dilation or 1
        mid = c_in if down else c_out
        self.norm1 = CondInstanceNormPlus(c_in, num_classes)
        self.conv1 = conv3x3(c_in, mid, dilation=d)
        self.norm2 = CondInstanceNormPlus(mid, num_classes)
        if down and dilation is None:
            self.conv2 = ConvMeanPool(mid, c_out, 3)
            self.shortcut = ConvMeanPool(c_in, c_out, 1)
        else:
            self.conv2 = conv3x3(mid, c_out, dilation=d)
            self.shortcut = conv3x3(c_in, c_out, dilation=d) if down else None
        assert down or c_in == c_out, "a plain block keeps its width"

    def forward(self, x, y):
        h = self.conv1(self.norm1(x, y, self.act))
        h = self.conv2(self.norm2(h, y, self.act))
        return h + (x if self.shortcut is None else self.shortcut(x))


class CondRCU(nn.Module):
    """Residual conv units: n_blocks times [x += (CIN++ -> ELU -> 3x3 conv, no bias) applied twice]."""

    def __init__(self, c, n_blocks, num_classes, act, n_stages=2):
        super().__init__()
        self.act = act
        self.norms = nn.ModuleList([CondInstanceNormPlus(c, num_classes) for _ in range(n_blocks * n_stages)])
        self.convs = nn.ModuleList([conv3x3(c, c, bias=False) for _ in range(n_blocks * n_stages)])
        self.n_blocks, self.n_stages = n_blocks, n_stages

    def forward(self, x, y):
        for b in range(self.n_blocks):
            h = x
            for s in range(b * self.n_stages, (b + 1) * self.n_stages):
                h = self.convs[s](self.norms[s](h, y, self.act))
            x = x + h
        return x


def linear_interpolation_matrix(n_out, n_in, device, dtype):
    """(n_out, n_in): row i holds the weights of 1-D linear interpolation with align_corners=True at output i,
    i.e. at the input coordinate i (n_in - 1) / (n_out - 1). The positions are float64 on the CPU, then moved
    (MPS has no float64)."""
    pos = torch.arange(n_out, dtype=torch.float64) * ((n_in - 1) / max(n_out - 1, 1))  # (n_out,) on the CPU
    lo = pos.floor().clamp(max=max(n_in - 2, 0)).long()  # (n_out,) the left neighbour
    frac = (pos - lo).to(dtype).to(device)  # converted on the CPU, then moved
    lo = lo.to(device)
    m = torch.zeros(n_out, n_in, device=device, dtype=dtype)
    rows = torch.arange(n_out, device=device)
    m[rows, lo] = 1 - frac
    if n_in > 1:
        m[rows, lo + 1] += frac
    return m


def resize_bilinear(h, size):
    """F.interpolate(h, size, mode="bilinear", align_corners=True). Under torch.use_deterministic_algorithms
    (--deterministic) the same map as two small matrix products, A_H h A_W^T, whose backward is deterministic:
    CUDA has no deterministic backward for bilinear interpolation and would raise."""
    if not torch.are_deterministic_algorithms_enabled():
        return F.interpolate(h, size=size, mode="bilinear", align_corners=True)
    a_h = linear_interpolation_matrix(size[0], h.shape[-2], h.device, h.dtype)  # (H_out, H)
    a_w = linear_interpolation_matrix(size[1], h.shape[-1], h.device, h.dtype)  # (W_out, W)
    return torch.einsum("ih,bchw,jw->bcij", a_h, h, a_w)  # (B, C, H_out, W_out)


class CondMSF(nn.Module):
    """Multi-resolution fusion: per input CIN++ -> 3x3 conv to F channels -> bilinear resize; summed."""

    def __init__(self, c_ins, features, num_classes):
        super().__init__()
        self.norms = nn.ModuleList([CondInstanceNormPlus(c, num_classes) for c in c_ins])
        self.convs = nn.ModuleList([conv3x3(c, features) for c in c_ins])

    def forward(self, xs, y, size):
        out = 0
        for x, norm, conv in zip(xs, self.norms, self.convs):
            h = conv(norm(x, y))
            if tuple(h.shape[-2:]) != tuple(size):  # same size: align_corners=True resize is the identity
                h = resize_bilinear(h, size)
            out = out + h
        return out


class CondCRP(nn.Module):
    """Chained residual pooling: x = ELU(x); twice: path = conv(avgpool5x5(CIN++(path))); x += path."""

    def __init__(self, features, num_classes, act, n_stages=2):
        super().__init__()
        self.act = act
        self.fast = False  # the 5x5 mean as a depthwise convolution (on CPU 3-10x faster than avg_pool2d)
        self.norms = nn.ModuleList([CondInstanceNormPlus(features, num_classes) for _ in range(n_stages)])
        self.convs = nn.ModuleList([conv3x3(features, features, bias=False) for _ in range(n_stages)])

    def pool(self, x):  # 5x5 average, stride 1, zero padding 2 counted (count_include_pad)
        if self.fast:  # the 5x5 sum by an all-ones depthwise kernel, then / 25: ones are exact in bf16, where
            # a 1/25 kernel rounds to 0.0400390625 and would bias every output by +0.1% under bf16 autocast
            return F.conv2d(x, x.new_ones((x.shape[1], 1, 5, 5)), padding=2, groups=x.shape[1]).mul_(1 / 25)
        return F.avg_pool2d(x, 5, stride=1, padding=2)

    def forward(self, x, y):
        x = self.act(x)
        path = x
        for norm, conv in zip(self.norms, self.convs):
            path = conv(self.pool(norm(path, y)))
            x = x + path
        return x


class CondRefineBlock(nn.Module):
    """RefineNet block: adapt each input (RCU x2), fuse (MSF) if several, CRP, output RCU (x3 at the end)."""

    def __init__(self, c_ins, features, num_classes, act, end=False):
        super().__init__()
        self.adapt = nn.ModuleList([CondRCU(c, 2, num_classes, act) for c in c_ins])
        self.msf = CondMSF(c_ins, features, num_classes) if len(c_ins) > 1 else None
        self.crp = CondCRP(features, num_classes, act)
        self.out = CondRCU(features, 3 if end else 1, num_classes, act)

    def forward(self, xs, y, size):
        hs = [adapt(x, y) for adapt, x in zip(self.adapt, xs)]
        h = hs[0] if self.msf is None else self.msf(hs, y, size)
        return self.out(self.crp(h, y), y)


class CondRefineNetDilated(nn.Module):
    """Score network s_theta(x, sigma_i), conditioned on the noise level index i (section 4.2).

    forward(x, y): x (B, channels, H, W) in [0, 1] (or logit space), y (B,) level indices in [0, L).
    Returns the estimated score, same shape as x. The output is not divided by sigma (v1 network).
    """

    def __init__(self, ngf=64, num_classes=10, channels=1, logit_transform=False, fast_kernels=True):
        super().__init__()
        C, L = ngf, num_classes
        # fast_kernels: the same functions from faster kernels (ELU, CIN++ statistics, the 5x5 mean pooling)
        act = self.act = fast_elu_fn if fast_kernels else F.elu
        self.logit_transform = logit_transform
        self.begin_conv = nn.Conv2d(channels, C, 3, padding=1)
        self.res1 = nn.ModuleList([CondResBlock(C, C, L, act), CondResBlock(C, C, L, act)])  # 28x28
        self.res2 = nn.ModuleList([CondResBlock(C, 2 * C, L, act, down=True),
                                   CondResBlock(2 * C, 2 * C, L, act)])  # 14x14
        self.res3 = nn.ModuleList([CondResBlock(2 * C, 2 * C, L, act, down=True, dilation=2),
                                   CondResBlock(2 * C, 2 * C, L, act, dilation=2)])  # 14x14
        self.res4 = nn.ModuleList([CondResBlock(2 * C, 2 * C, L, act, down=True, dilation=4),
                                   CondResBlock(2 * C, 2 * C, L, act, dilation=4)])  # 14x14
        self.refine1 = CondRefineBlock([2 * C], 2 * C, L, act)
        self.refine2 = CondRefineBlock([2 * C, 2 * C], 2 * C, L, act)
        self.refine3 = CondRefineBlock([2 * C, 2 * C], C, L, act)
        self.refine4 = CondRefineBlock([C, C], C, L, act, end=True)
        self.end_norm = CondInstanceNormPlus(C, L)
        self.end_conv = nn.Conv2d(C, channels, 3, padding=1)
        for m in self.modules():
            if isinstance(m, (CondInstanceNormPlus, CondCRP)):
                m.fast = fast_kernels

    def compile_norms(self, **options):
        """torch.compile only CIN++ and the ELU after it (cin_plus_elu, one compiled function shared by every
        CIN++ of the network): the convolutions stay eager. Much less to compile than the whole network.

        Only the first batch size met with gradients and the first without are compiled; any other runs the same
        function eagerly. So the short last batch of an epoch (32 images at batch 64) costs one slower step instead
        of compiling every graph again (as long as the first)."""
        # one graph per input shape, with and without the ELU, for training and for inference: more than dynamo's
        # default of 8 recompilations of one function
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        compiled = torch.compile(cin_plus_elu, **options)
        batch = {}  # torch.is_grad_enabled() -> the batch size compiled for

        def fused(x, y, weight, eps, elu):
            if batch.setdefault(torch.is_grad_enabled(), x.shape[0]) != x.shape[0]:
                return cin_plus_elu(x, y, weight, eps, elu)
            return compiled(x, y, weight, eps, elu)

        for m in self.modules():
            if isinstance(m, CondInstanceNormPlus):
                m.fused = fused
        return self

    def eager(self):
        """Undo compile() and compile_norms(): every later call runs the plain modules (the same function). For a
        compile that cannot build its kernels on this machine (build.compile_model)."""
        self._compiled_call_impl = None  # what nn.Module.compile() set
        for m in self.modules():
            if isinstance(m, CondInstanceNormPlus):
                m.fused = None
        return self

    @staticmethod
    def _stage(blocks, x, y):
        for block in blocks:
            x = block(x, y)
        return x

    def forward(self, x, y):  # x (B, 1, 28, 28), y (B,)
        if not self.logit_transform:
            x = 2 * x - 1
        with torch.autocast(x.device.type, enabled=False):  # the input keeps fp32 under bf16 autocast: it must
            h = self.begin_conv(x.float())  # (B, C, 28, 28)  resolve noise of sigma_L = 0.01
        layer1 = self._stage(self.res1, h, y)  # (B, C, 28, 28)
        layer2 = self._stage(self.res2, layer1, y)  # (B, 2C, 14, 14)
        layer3 = self._stage(self.res3, layer2, y)  # (B, 2C, 14, 14)
        layer4 = self._stage(self.res4, layer3, y)  # (B, 2C, 14, 14)
        ref1 = self.refine1([layer4], y, layer4.shape[-2:])  # (B, 2C, 14, 14)
        ref2 = self.refine2([layer3, ref1], y, layer3.shape[-2:])  # (B, 2C, 14, 14)
        ref3 = self.refine3([layer2, ref2], y, layer2.shape[-2:])  # (B, C, 14, 14)
        out = self.refine4([layer1, ref3], y, layer1.shape[-2:])  # (B, C, 28, 28)
        h = self.end_norm(out, y, self.act)
        with torch.autocast(x.device.type, enabled=False):  # the score in fp32 as well
            return self.end_conv(h.float())  # (B, 1, 28, 28)
