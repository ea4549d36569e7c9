"""--device, --deterministic and the precision switches, on the CPU: what runs where is decided by the flag and
nothing else, a missing device is a one-line error, and a fast-path switch a device lacks falls back with
one logged line. The CUDA side of these is in tests/test_cuda.py (skipped without a GPU)."""
import functools
import os

import pytest
import torch
import torch._dynamo  # noqa: F401  built now, with torch's real functions: it tabulates them on first import
import torch.nn.functional as F

import devices
import main
import model
from conftest import CPU, assert_same_weights, graph_counter, tiny_config, train_off_and_on, write_config


def reports(monkeypatch, module, name, value):
    """module.name() returns `value`; functools.wraps keeps what torch._dynamo reads off the original."""
    monkeypatch.setattr(module, name, functools.wraps(getattr(module, name))(lambda *args: value))


def pretend_gpus_everywhere(monkeypatch):
    """CUDA and MPS reported as available, and the way into CUDA booby-trapped (every CUDA tensor goes through
    torch.cuda._lazy_init first): a run that touched CUDA would fail instead of quietly using the CPU; an MPS
    tensor fails by itself on this Linux machine."""
    def trap(*args, **kwargs):
        raise AssertionError("touched CUDA or MPS")

    reports(monkeypatch, torch.cuda, "is_available", True)
    reports(monkeypatch, torch.cuda, "device_count", 1)
    reports(monkeypatch, torch.backends.mps, "is_available", True)
    for name in ("_lazy_init", "set_device", "synchronize", "get_device_name"):
        monkeypatch.setattr(torch.cuda, name, trap)
    # torch's own Adam.step asks CUDA whether a graph is being captured whenever CUDA is reported present (it
    # allocates nothing); that is torch's business, not the run's, so it is left out of the trap
    monkeypatch.setattr(torch.optim.Optimizer, "_accelerator_graph_capture_health_check", lambda self: None)


def test_resolve_device_follows_the_flag(monkeypatch):
    pretend_gpus_everywhere(monkeypatch)
    assert devices.resolve_device("cpu") == torch.device("cpu")
    assert devices.resolve_device("auto") == torch.device("cuda", 0)  # CUDA first ...
    assert devices.resolve_device("auto", local_rank=0) == torch.device("cuda", 0)
    assert devices.resolve_device("cuda:0") == torch.device("cuda", 0)
    assert devices.resolve_device("mps") == torch.device("mps")
    reports(monkeypatch, torch.cuda, "is_available", False)
    assert devices.resolve_device("auto") == torch.device("mps")  # ... then MPS ...
    reports(monkeypatch, torch.backends.mps, "is_available", False)
    assert devices.resolve_device("auto") == torch.device("cpu")  # ... then the CPU


def test_missing_devices_are_one_line_errors(monkeypatch, tmp_path, fake_mnist, capsys):
    reports(monkeypatch, torch.cuda, "is_available", False)
    reports(monkeypatch, torch.backends.mps, "is_available", False)
    cfg = write_config(tmp_path / "c.yml", tiny_config(fake_mnist))
    for flag, says in (("cuda", "CUDA is not available"), ("cuda:1", "CUDA is not available"),
                       ("mps", "MPS backend is not available")):
        assert main.main(["--device", flag, "--config", cfg, "--run", str(tmp_path / "run"), "--doc", "x"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
    assert not (tmp_path / "run").exists()  # nothing written
    reports(monkeypatch, torch.cuda, "is_available", True)
    reports(monkeypatch, torch.cuda, "device_count", 1)
    with pytest.raises(devices.NCSNError, match="has 1 CUDA device"):
        devices.resolve_device("cuda:1")
    with pytest.raises(SystemExit):  # a misspelt device is argparse's usage error (exit 2)
        main.parse_args(["--device", "gpu"])


@pytest.mark.parametrize("gpus", [True, False], ids=["gpus reported", "no gpus"])
def test_device_cpu_runs_on_the_cpu_only(monkeypatch, tmp_path, fake_mnist, gpus):
    """Training, sampling and --eval with --device cpu, with CUDA and MPS reported as present (every way into
    them trapped) and absent: the run says cpu in its own log and its checkpoint holds CPU tensors."""
    if gpus:
        pretend_gpus_everywhere(monkeypatch)
    else:
        reports(monkeypatch, torch.cuda, "is_available", False)
        reports(monkeypatch, torch.backends.mps, "is_available", False)
    import metrics
    monkeypatch.setitem(metrics.TRAIN_SETTINGS, "epochs", 1)
    cfg = tiny_config(fake_mnist, **{"training.n_iters": 2, "training.snapshot_freq": 2, "eval.n_samples": 4,
                                     "eval.loss_images": 8})
    run = ["--run", str(tmp_path / "run"), "--doc", "d"]
    assert main.main(["--device", "cpu", "--config", write_config(tmp_path / "c.yml", cfg), *run]) == 0
    assert "device cpu, torch" in (tmp_path / "run" / "logs" / "d" / "stdout.txt").read_text()
    ckpt = torch.load(tmp_path / "run" / "logs" / "d" / "checkpoint.pth", weights_only=True)
    assert all(t.device.type == "cpu" for t in ckpt["model"].values())
    assert main.main(["--device", "cpu", *run, "--sample", "-o", str(tmp_path / "s")]) == 0
    assert main.main(["--device", "cpu", *run, "--eval"]) == 0


def test_precision_switches_are_set_and_logged(tmp_path, fake_mnist, ncsn_log):
    """fast.tf32 off means true fp32 for CUDA's matmuls and convolutions (torch's own default for convolutions
    is TF32); cudnn.benchmark follows fast.cudnn_benchmark unless the run is deterministic."""
    from schema import config_from_dict

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        for tf32, bench in ((True, True), (False, False), (True, False)):
            cfg = config_from_dict(tiny_config(fake_mnist, **{"fast.tf32": tf32, "fast.cudnn_benchmark": bench}))
            torch.backends.cudnn.allow_tf32 = not tf32
            torch.backends.cuda.matmul.allow_tf32 = not tf32
            devices.set_precision(cfg, torch.device("cpu"))
            assert torch.backends.cudnn.allow_tf32 is tf32 and torch.backends.cuda.matmul.allow_tf32 is tf32
            assert torch.backends.cudnn.benchmark is bench
        assert any(m.startswith("precision on cpu: fp32, bf16 autocast off, deterministic off") for m in ncsn_log)
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = saved


def test_a_missing_fast_path_switch_falls_back_with_one_line(monkeypatch, tmp_path, fake_mnist, capsys):
    """bf16 autocast and fused Adam reported missing (as on some MPS versions): the run trains in fp32 with
    torch's default Adam, and says so once each."""
    import build
    import schema

    devices.bf16_autocast_ok.cache_clear()
    devices.fused_adam_ok.cache_clear()
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    real_adam = torch.optim.Adam
    made = []

    def adam(params, *args, fused=None, **kwargs):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be on a supported device")
        made.append(fused)
        return real_adam(params, *args, fused=fused, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", adam)
    try:
        cfg = tiny_config(fake_mnist, **{"training.n_iters": 2, "fast.bf16": True, "fast.fused_adam": True})
        assert main.main([*CPU, "--config", write_config(tmp_path / "c.yml", cfg), "--run", str(tmp_path / "run"),
                          "--doc", "f"]) == 0
        err = capsys.readouterr().err  # main.py's log
        assert err.count("bf16 autocast is not available on cpu; running in fp32") == 1
        assert err.count("fused Adam is not available on cpu; using torch's default Adam") == 1
        assert "precision on cpu: fp32, bf16 autocast off" in err
        assert made == [None]  # the run's optimiser is torch's default Adam
        with build.autocast(schema.config_from_dict(cfg), torch.device("cpu")):
            assert not torch.is_autocast_enabled("cpu")
    finally:
        devices.bf16_autocast_ok.cache_clear()
        devices.fused_adam_ok.cache_clear()


def test_deterministic_resize_is_bilinear_interpolation():
    """Under --deterministic the network resizes with A_H h A_W^T (CUDA has no deterministic backward for
    bilinear interpolation): the same values and gradients as F.interpolate(align_corners=True)."""
    g = torch.Generator().manual_seed(0)
    for shape, size in (((2, 3, 7, 7), (14, 14)), ((2, 3, 4, 4), (7, 7)), ((1, 2, 14, 14), (28, 28)),
                        ((1, 1, 1, 5), (3, 9))):
        x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
        w = torch.randn((shape[0], shape[1], *size), generator=g, dtype=torch.float64)
        ref = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        (grad_ref,) = torch.autograd.grad((ref * w).sum(), x)
        torch.use_deterministic_algorithms(True)
        try:
            out = model.resize_bilinear(x, size)
            (grad,) = torch.autograd.grad((out * w).sum(), x)
        finally:
            torch.use_deterministic_algorithms(False)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-12)


def test_deterministic_flag_trains_the_same_twice(tmp_path, fake_mnist, monkeypatch):
    """--deterministic turns torch's deterministic algorithms on for the run (and the run still trains)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # the run sets it: unset again after this test
    cfg = write_config(tmp_path / "c.yml", tiny_config(fake_mnist, **{"training.n_iters": 3}))
    try:
        for doc in ("a", "b"):
            assert main.main([*CPU, "--deterministic", "--config", cfg, "--run", str(tmp_path / "run"),
                              "--doc", doc]) == 0
            assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    a, b = (torch.load(tmp_path / "run" / "logs" / d / "checkpoint.pth", weights_only=True)["model"] for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # dynamo traces the whole network three times (about 4 s each)
def test_compile_switch_compiles_the_network_and_changes_nothing_else(monkeypatch, tmp_path, fake_mnist):
    """fast.compile puts the training network and the sampling network under torch.compile (here through a
    backend that runs and counts dynamo's graphs, without the minutes inductor spends generating kernels) and
    changes nothing else: the weights and EMA of the compiled run equal the eager run's to float rounding, the
    checkpoint holds the plain module's keys, and --sample reads it."""
    compiled = []
    module_compile = torch.nn.Module.compile
    backend, graphs = graph_counter()

    def spy(self, *args, **kwargs):
        compiled.append(type(self).__name__)
        return module_compile(self, *args, **{**kwargs, "backend": backend})

    monkeypatch.setattr(torch.nn.Module, "compile", spy)
    try:
        run, ckpts = train_off_and_on(tmp_path, fake_mnist, ["fast.compile"])
        assert compiled == ["CondRefineNetDilated"]  # the training network; the EMA copy stays eager
        trained_with = len(graphs)
        assert trained_with > 0  # the compiled network ran in training
        assert main.main([*CPU, "--run", run, "--doc", "True", "--sample", "-o", str(tmp_path / "s")]) == 0
    finally:
        torch._dynamo.reset()
    assert compiled == ["CondRefineNetDilated"] * 2 and len(graphs) > trained_with  # and the sampling network
    assert ckpts[True]["config"]["fast"]["compile"] and not ckpts[False]["config"]["fast"]["compile"]
    assert_same_weights(ckpts[False], ckpts[True])
    assert os.path.isfile(tmp_path / "s" / "samples.png")


def test_device_cuda_n_under_torchrun_is_a_one_line_error(monkeypatch, tmp_path, fake_mnist, capsys):
    """Under torchrun with several processes, --device cuda:N would put every rank on GPU N (NCCL: duplicate
    GPU): refused in one line before any process group or file, with the way out; one process may name a GPU."""
    pretend_gpus_everywhere(monkeypatch)
    reports(monkeypatch, torch.cuda, "device_count", 2)
    with pytest.raises(devices.NCSNError, match="under torchrun would give every process the same GPU"):
        devices.resolve_device("cuda:1", local_rank=0)
    assert devices.resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)  # the documented form
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)  # one process: that GPU
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    cfg = write_config(tmp_path / "c.yml", tiny_config(fake_mnist))
    assert main.main(["--device", "cuda:0", "--config", cfg, "--run", str(tmp_path / "run"), "--doc", "x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device cuda:0 under torchrun" in err[0] and "--device cuda " in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("fails", [False, True])
def test_under_torchrun_no_rank_tears_down_before_every_rank_has_finished(monkeypatch, tmp_path, fake_mnist, fails):
    """Under torchrun a command that ends well meets the other ranks at a barrier before destroy_process_group:
    rank 0 has written its files before any rank tears down (a rank tearing down alone can abort, and torchrun
    then kills rank 0 mid-write). A command that failed goes straight to teardown, not to a barrier that the
    other ranks might never reach. The process group is faked: the order of the calls is the behaviour."""
    from common import NCSNError
    calls = []

    def command(args, config, device):
        calls.append("command")
        if fails:
            raise NCSNError("this rank failed")
        return 0

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(main, "start", lambda args, distributed: torch.device("cpu"))
    monkeypatch.setattr(main, "run_command", command)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: calls.append("destroy"))
    cfg = write_config(tmp_path / "c.yml", tiny_config(fake_mnist))
    status = main.main([*CPU, "--config", cfg, "--run", str(tmp_path / "run"), "--doc", "x"])
    assert (status, calls) == ((1, ["command", "destroy"]) if fails else (0, ["command", "barrier", "destroy"]))


def test_set_deterministic_false_restores_torchs_defaults():
    """A --deterministic run followed by a default one in the same process (tests/test_cuda.py does this): the
    second has torch's default kernels again, cuDNN's included."""
    saved = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        devices.set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in devices.CUBLAS_DETERMINISTIC_VALUES
        devices.set_deterministic(False)
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic is False
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        if saved is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved


def test_deterministic_with_another_cublas_workspace_is_a_one_line_error(monkeypatch, tmp_path, fake_mnist, capsys):
    """--deterministic with a CUBLAS_WORKSPACE_CONFIG that is not one of CUDA's two deterministic settings would
    fail at the first CUDA matmul: it is a one-line error before anything is written; both settings are kept."""
    cfg = write_config(tmp_path / "c.yml", tiny_config(fake_mnist, **{"training.n_iters": 1}))
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    try:
        assert main.main([*CPU, "--deterministic", "--config", cfg, "--run", str(tmp_path / "run"),
                          "--doc", "x"]) == 1
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ERROR")]
        assert len(err) == 1 and "CUBLAS_WORKSPACE_CONFIG" in err[0] and "':0:0'" in err[0], err
        assert not (tmp_path / "run").exists()
        assert not torch.are_deterministic_algorithms_enabled()
        for value in devices.CUBLAS_DETERMINISTIC_VALUES:
            monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", value)
            devices.set_deterministic(True)
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == value
    finally:
        devices.set_deterministic(False)
