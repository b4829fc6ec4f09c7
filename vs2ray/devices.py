"""Which device a process computes on, at which precision, and a record of the machine (DESIGN.md "Devices").

Torch only (no Ray): the Ray-side callers pass in the GPU ids Ray gave them (`ray.get_gpu_ids()`).

- A process runs on the GPUs Ray gave it and only those. Ray 2.60 no longer hides GPUs from a
  process given none, so "CUDA is available" is never the test: a process given no GPU runs on
  the CPU even on a GPU node.
- A process given a GPU that torch cannot see stops with `GpuUnavailable`, naming torch's CUDA
  build and the NVIDIA driver, instead of running on the CPU in silence.
- Tests and benchmarks that hand fake GPU resources to CPU-only processes say so explicitly:
  `VS2RAY_FAKE_GPUS=1` in the environment (Ray's own `AutoscalingCluster` and `Cluster` fake
  GPUs this way); such a process runs on the CPU and records `fake_gpus: true`.
- Precision (`model.precision`, `sae.precision`): fp32 is the reference; tf32 lets CUDA matmuls
  and convolutions use TensorFloat-32; bf16 and fp16 run under `torch.autocast` with the weights
  (and so LayerNorm's parameters and the optimiser's master weights) kept in fp32.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

Precision = Literal["fp32", "tf32", "bf16", "fp16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "tf32", "bf16", "fp16")
FAKE_GPUS_ENV = "VS2RAY_FAKE_GPUS"

# The oldest NVIDIA driver (major version) each CUDA major version of a torch build runs on
# (NVIDIA's minor-version compatibility: any 12.x build on a >= 525 driver, 13.x on >= 580).
MIN_DRIVER_FOR_CUDA = {"11": 450, "12": 525, "13": 580}


class GpuUnavailable(RuntimeError):
    """A process was given a GPU (or asked for CUDA) and torch cannot use one; the message says why."""


def fake_gpus() -> bool:
    """Whether this process's GPU resources are declared fake (`VS2RAY_FAKE_GPUS=1`: tests, benchmarks)."""
    return os.environ.get(FAKE_GPUS_ENV, "") not in ("", "0", "false", "False")


def nvidia_driver_version() -> str | None:
    """The NVIDIA kernel driver's version (e.g. '570.133.20'), or None where there is no NVIDIA driver."""
    proc = Path("/proc/driver/nvidia/version")
    if proc.is_file():
        found = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", proc.read_text())
        if found:
            return found.group(1)
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        lines = out.stdout.strip().splitlines()
        return lines[0].strip() if out.returncode == 0 and lines else None
    return None


def cuda_diagnosis() -> str:
    """One sentence on why torch sees no CUDA device: its CUDA build against the driver that is installed."""
    build, driver = torch.version.cuda, nvidia_driver_version()
    if build is None:
        return f"torch {torch.__version__} is a CPU-only build; install a CUDA build (see cluster/constraints.txt)"
    needed = MIN_DRIVER_FOR_CUDA.get(build.split(".")[0])
    if driver is None:
        return f"torch {torch.__version__} is built for CUDA {build}, and no NVIDIA driver was found (nvidia-smi)"
    hint = ""
    if needed is not None and int(driver.split(".")[0]) < needed:
        hint = (
            f": a CUDA {build} build needs driver >= {needed}; install the torch that cluster/constraints.txt "
            f"pins, or a newer driver"
        )
    return f"torch {torch.__version__} is built for CUDA {build}; the NVIDIA driver is {driver}{hint}"


def worker_device(setting: str, gpu_ids: Sequence[Any] | None, what: str = "this process") -> torch.device:
    """The device a stage computes on.

    `gpu_ids` are the GPUs Ray gave the process (`ray.get_gpu_ids()`), or None outside a Ray worker,
    where `setting` ('auto' | 'cpu' | 'cuda', i.e. `model.device`) decides by what torch sees.
    Inside a worker: given no GPU -> cpu (whatever the node has); given some -> cuda:0 (Ray limits
    CUDA_VISIBLE_DEVICES to them), unless `setting` is 'cpu' or the GPUs are declared fake.
    Raises GpuUnavailable where a GPU was given (or `setting` is 'cuda') and torch sees none.
    """
    if setting not in ("auto", "cpu", "cuda"):
        raise ValueError(f"model.device must be 'auto', 'cpu' or 'cuda', got {setting!r}")
    if setting == "cpu":
        return torch.device("cpu")
    if gpu_ids is None:  # not a Ray worker: a CLI stage on this machine
        if setting == "cuda" and not torch.cuda.is_available():
            raise GpuUnavailable(f"model.device: cuda, but torch sees no CUDA device ({cuda_diagnosis()})")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not gpu_ids:
        if setting == "cuda":
            raise GpuUnavailable(
                f"model.device: cuda, but Ray gave {what} no GPU: give it one (extraction.gpus_per_worker, "
                f"resources.gpus_per_trial) or set model.device: auto"
            )
        return torch.device("cpu")
    if fake_gpus():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise GpuUnavailable(
            f"Ray gave {what} GPU {list(gpu_ids)} but torch sees no CUDA device: {cuda_diagnosis()}. "
            f"If these GPU resources are fake (a test cluster), set {FAKE_GPUS_ENV}=1."
        )
    return torch.device("cuda", 0)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
HEAP_MMAP_THRESHOLD = 4 * 2**20


@functools.cache  # once per process
def bound_heap_growth() -> None:
    """Fix glibc's mmap threshold at 4 MiB, once per process (a no-op off glibc).

    Reading a store in batches frees and reallocates the same few-MiB buffers every batch. glibc raises
    its mmap threshold to the largest block freed so far (up to 32 MiB), after which such buffers come
    from the heap, which fragments and never shrinks: measured here, an all-token calibration over a
    624 MB column grew private memory by 583 MB, against 15 MB with the threshold fixed."""
    libc = _glibc()
    if libc is not None:  # another C library's allocator has its own policy
        libc.mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)


@functools.cache
def _glibc() -> Any | None:
    """This process's C library, where it is glibc (it has mallopt and malloc_trim); None elsewhere."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def trim_heap() -> bool:
    """Hand the heap's free pages back to the system (glibc's malloc_trim); True when some were.

    A pass over a store in parts allocates and frees each part's arrays, and the small ones among them
    (under the mmap threshold) leave the heap's free pages scattered between live blocks, where glibc
    keeps them: measured here, over the 8 GB synthetic store's 205 validation parts, an evaluation's
    private memory peaked 185–365 MB above what it held once the Evaluator was built (three runs), and
    99 MB above it trimmed after each part (on the 0.5 GB store a trim took 5 ms a part, 3% of the
    evaluation). False off glibc."""
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))


def limit_gpu_memory(device: torch.device, gpu_share: float) -> None:
    """Cap this process's CUDA allocations at its fractional GPU share (e.g. 0.25 of the card), so that
    trials sharing a GPU cannot starve each other; a whole GPU or the CPU is left alone."""
    if device.type == "cuda" and 0 < gpu_share < 1:
        torch.cuda.set_per_process_memory_fraction(gpu_share, device)


def free_gpu_bytes(device: torch.device) -> int:
    """What this process may still allocate on a CUDA device: the device's free memory, capped by the
    share `limit_gpu_memory` set (a trial on 0.25 of a GPU may use a quarter of it, whatever is free)."""
    free, total = torch.cuda.mem_get_info(device)
    allowed = int(torch.cuda.get_per_process_memory_fraction(device) * total) - torch.cuda.memory_reserved(device)
    return max(0, min(free, allowed))


@contextlib.contextmanager
def precision_scope(device: torch.device | str, precision: str) -> Iterator[None]:
    """Run the enclosed forward passes at `precision` on `device` (module docstring); fp32 changes nothing.

    tf32 only affects CUDA (the CPU has no TensorFloat-32); bf16 and fp16 are autocast on either device.
    """
    device = torch.device(device)
    if precision == "fp32":
        yield
    elif precision == "tf32":
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    elif precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        with torch.autocast(device.type, dtype=dtype):
            yield
    else:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """What a store manifest and a trial result record of the machine: torch and its CUDA build, the NVIDIA
    driver, and the device that computed (its name and compute capability on a GPU)."""
    record: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "driver": nvidia_driver_version(),
        "python": platform.python_version(),
        "fake_gpus": fake_gpus(),
    }
    if device is not None:
        device = torch.device(device)
        record["device"] = str(device)
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            record["gpu"] = torch.cuda.get_device_name(index)
            record["capability"] = ".".join(map(str, torch.cuda.get_device_capability(index)))
    return record
