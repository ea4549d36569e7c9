"""Which device a run uses and with which numerics: `--device`, `--deterministic`, the precision switches of
`fast:`, and a logged fallback where a device lacks a fast-path switch. Its own module so that main.py stays flags and dispatch and runner.py stays the
method; every command asks here, once, and logs what it got.

    auto     CUDA (under torchrun: cuda:LOCAL_RANK), else Apple MPS, else the CPU
    cpu      the CPU, even where CUDA or MPS is present
    cuda     cuda:LOCAL_RANK under torchrun, else cuda:0
    cuda:N   that GPU (a one-line error if it is not there, and under torchrun with several processes: every
             rank would take the same GPU; choose the GPUs with CUDA_VISIBLE_DEVICES and pass --device cuda)
    mps      Apple silicon
"""
import functools
import logging
import os

import torch

from common import NCSNError

log = logging.getLogger("ncsn")

CUBLAS_DETERMINISTIC = ":4096:8"  # the cuBLAS workspace setting that deterministic GEMMs need (CUDA docs) ...
CUBLAS_DETERMINISTIC_VALUES = (":4096:8", ":16:8")  # ... the two that CUDA documents and torch accepts


def mps_available():
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def resolve_device(name, local_rank=None):
    """The torch.device for --device `name`; `local_rank` is torchrun's LOCAL_RANK (None for one process).
    A device that is not there is a one-line NCSNError, never a silent fall back to the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not mps_available():
            raise NCSNError("--device mps: Apple's MPS backend is not available here (use --device cpu or auto)")
        if local_rank is not None:
            raise NCSNError("--device mps runs one process: torchrun with several processes needs CUDA or the CPU")
        return torch.device("mps")
    if ":" in name and local_rank is not None:
        raise NCSNError(f"--device {name} under torchrun would give every process the same GPU: pass --device cuda "
                        f"(each process takes cuda:LOCAL_RANK) and choose the GPUs with CUDA_VISIBLE_DEVICES")
    if not torch.cuda.is_available():
        raise NCSNError(f"--device {name}: CUDA is not available here (use --device cpu or auto)")
    index = int(name.split(":")[1]) if ":" in name else (local_rank or 0)
    if index >= torch.cuda.device_count():
        raise NCSNError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"numbered from 0" + (f" (torchrun's LOCAL_RANK is {local_rank})" if local_rank else ""))
    return torch.device("cuda", index)


def set_deterministic(on):
    """--deterministic: torch's deterministic algorithms only (an op that has none is an error, not a silent
    fallback), cuDNN's deterministic convolutions, and the cuBLAS workspace they need. Before any CUDA work.
    A CUBLAS_WORKSPACE_CONFIG of the user's that is not one of CUDA's deterministic settings is a one-line
    NCSNError (torch would fail at the first matmul). set_deterministic(False) restores torch's defaults: no
    deterministic algorithms, cuDNN free to choose (a second run in one process, as in the tests)."""
    if on:
        workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
        if workspace is not None and workspace not in CUBLAS_DETERMINISTIC_VALUES:
            raise NCSNError(f"--deterministic needs CUBLAS_WORKSPACE_CONFIG={CUBLAS_DETERMINISTIC_VALUES[0]} or "
                            f"{CUBLAS_DETERMINISTIC_VALUES[1]} (cuBLAS's deterministic workspaces), but it is set to "
                            f"{workspace!r}: unset it or set one of those")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on


def warn_slow_precision(config, device):
    """One logged line when fast.bf16 is on for a CPU without native bf16 (no AVX512-BF16 or AMX): there oneDNN
    emulates it, several times slower than fp32 (docs/design.md#precision-the-path-per-machine)."""
    if not config.fast.bf16 or device.type != "cpu":
        return
    if cpu_native_bf16() is False:  # None: this torch cannot tell, and nothing is said
        log.warning("fast.bf16 is on, but this CPU (%s) has no native bf16: expect it to run several times slower "
                    "than fp32; set fast.bf16: false", torch.backends.cpu.get_cpu_capability())


def cpu_native_bf16():
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX); None where this torch cannot tell."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


def set_precision(config, device):
    """Make the precision of a run's config explicit on `device`, and log it in one line: TF32 matmuls and
    convolutions only when fast.tf32 is on (the plain path is true fp32; torch itself defaults to TF32
    convolutions), cudnn.benchmark only when fast.cudnn_benchmark is on and the run is not deterministic."""
    warn_slow_precision(config, device)
    fast, deterministic = config.fast, torch.are_deterministic_algorithms_enabled()
    torch.backends.cuda.matmul.allow_tf32 = fast.tf32
    torch.backends.cudnn.allow_tf32 = fast.tf32
    torch.backends.cudnn.benchmark = fast.cudnn_benchmark and not deterministic
    bf16 = "on" if fast.bf16 and bf16_autocast_ok(device) else "off"
    if device.type == "cuda":
        log.info("precision on %s (%s): %s, bf16 autocast %s, cudnn.benchmark %s, deterministic %s", device,
                 torch.cuda.get_device_name(device), "TF32" if fast.tf32 else "fp32 (TF32 off)", bf16,
                 "on" if torch.backends.cudnn.benchmark else "off", "on" if deterministic else "off")
    else:
        log.info("precision on %s: fp32, bf16 autocast %s, deterministic %s", device.type, bf16,
                 "on" if deterministic else "off")


@functools.lru_cache(maxsize=None)
def bf16_autocast_ok(device):
    """Whether bf16 autocast runs on this device; where it does not, one logged line (once) and fp32 instead."""
    ok = torch.amp.is_autocast_available(device.type)
    if ok and device.type != "cpu":
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
        except (RuntimeError, TypeError):
            ok = False
    if not ok:
        log.warning("fast.bf16: bf16 autocast is not available on %s; running in fp32", device.type)
    return ok


@functools.lru_cache(maxsize=None)
def fused_adam_ok(device):
    """Whether torch's fused Adam runs on this device; where it does not, one logged line (once) and torch's
    default Adam instead."""
    try:
        p = torch.zeros(1, device=device, requires_grad=True)
        p.grad = torch.zeros(1, device=device)
        torch.optim.Adam([p], fused=True).step()
        return True
    except (RuntimeError, TypeError, ValueError):
        log.warning("fast.fused_adam: fused Adam is not available on %s; using torch's default Adam", device.type)
        return False


def use_fused_adam(config, device):
    """Adam's `fused` argument for a run of `config` whose parameters are on `device`: True when fast.fused_adam is
    on and the device has it (fused_adam_ok), else None (torch's default Adam). The optimizer a run builds and the
    one it restores from a checkpoint both ask here."""
    return True if config.fast.fused_adam and fused_adam_ok(device) else None
