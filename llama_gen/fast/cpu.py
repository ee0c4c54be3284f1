"""What this CPU's matmul kernels do well, for the load-time choices of the fast path.

Two facts differ between the x86 machines we run on, and each flips a choice (measured, benchmarks/RESULTS.md):

* Native bf16 matmuls. oneDNN has them with AVX512 (BW/VL/DQ; AVX512-BF16 and AMX make them fast) or
  AVX-NE-CONVERT. Without them (an AVX2-only CPU) PyTorch's bf16 matmul falls back to a reference kernel that
  is 4-8x slower than float32 for more than one row, and bf16 weights cannot be oneDNN-packed at all.
  (llama_gen.devices.has_native_bf16_matmul: the core warns about it too.)
* MKL's float32 matrix-vector kernel. On Intel CPUs it beats oneDNN's packed kernel at batch 1 (by ~25%);
  on other vendors MKL takes a generic code path and the packed kernel is ~1.7x faster.

Where neither library kernel reads weights at memory speed, the compiled step uses Inductor's own loops
(llama_gen.fast.gemv). llama_gen.fast.layout.choose_layout makes every choice from these facts, once, at load
time.
"""

import functools
import platform


@functools.cache
def cpuinfo_field(name: str) -> str:
    """Returns the first value of a /proc/cpuinfo field ("vendor_id", "flags", ...), or "" where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_vendor() -> str:
    """Returns the CPU's vendor id ("GenuineIntel", "AuthenticAMD", ...), or "" where it cannot be read."""
    return cpuinfo_field("vendor_id")


def mkl_gemv_is_fastest() -> bool:
    """True when MKL's float32 kernel on the plain weight layout is the fastest for a single row (Intel x86)."""
    return platform.machine().lower() in ("x86_64", "amd64") and cpu_vendor() == "GenuineIntel"
