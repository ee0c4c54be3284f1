"""Machine facts for benchmark reports: CPU/GPU name, memory bandwidth, resident memory of this process."""

import os
import platform
import subprocess
import time

import torch

from llama_gen.fast.memory import huge_page_tensors


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: str) -> str:
    """Returns e.g. 'Intel(R) Xeon(R) Processor, 2 cores, torch 2.13.0 (2 threads)' or the GPU's name."""
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}"
    return f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
        return out.stdout.strip() + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def memory_bandwidth(device: str = "cpu", gib: float = 1.0, repeats: int = 5) -> dict[str, float]:
    """Returns the measured read bandwidth (GB/s, a large tensor's sum) and copy bandwidth (read + write).

    The tensor is far larger than the caches; the best of ``repeats`` timings after a warm-up is used (STREAM's
    convention: what the memory system can deliver; other tenants of a shared machine only slow it down). On CPU
    the tensors sit on transparent huge pages, like the weights of our compiled path (on 4 KiB pages this probe
    read ~10 % less on the AMD EPYC of benchmarks/RESULTS.md: 28.7-31.0 vs 31.5-34.0 GB/s).
    """
    n = int(gib * 2**30) // 4
    if device == "cpu":
        x, y = huge_page_tensors([((n,), torch.float32)] * 2)
        x.fill_(1.0)
    else:
        x = torch.ones(n, dtype=torch.float32, device=device)
        y = torch.empty_like(x)

    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
        return min(times)

    nbytes = x.numel() * x.element_size()
    read = nbytes / timed(lambda: x.sum()) / 1e9
    copy = 2 * nbytes / timed(lambda: y.copy_(x)) / 1e9
    return {"read_gbs": read, "copy_gbs": copy}  # x and y are freed on return


def rss_mib() -> float:
    """Returns this process's resident memory now (MiB)."""
    return _status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    """Returns this process's peak resident memory so far (VmHWM, MiB)."""
    return _status_kib("VmHWM") / 1024


def _status_kib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
