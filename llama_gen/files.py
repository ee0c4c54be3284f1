"""Reading a checkpoint's files: a damaged one fails with one line naming it, what is wrong and what to do."""

import json
import pickle
from pathlib import Path

import torch

FIX = "copy it again from its source, or convert the model again"


def damaged(path: Path, what: str, error: BaseException | None = None) -> ValueError:
    """Returns the ValueError for a damaged file: its name, what is wrong (with error's first line), what to do."""
    reason = str(error).strip().splitlines()[0][:160] if error is not None and str(error).strip() else ""
    return ValueError(f"{path} {what}{f' ({reason})' if reason else ''}: {FIX}")


def read_json(path: Path) -> dict:
    """Returns the JSON object in path; FileNotFoundError if there is none, ValueError naming it if damaged."""
    try:
        value = json.loads(Path(path).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise damaged(path, "is not valid JSON" if Path(path).stat().st_size else "is empty", e) from e
    if not isinstance(value, dict):
        raise damaged(path, f"holds a JSON {type(value).__name__} where an object {{...}} belongs")
    return value


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """Returns a consolidated.XX.pth shard's tensors, memory-mapped; ValueError naming it if it is damaged."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise damaged(path, "is truncated or not a PyTorch checkpoint" if path.stat().st_size else "is empty", e) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise damaged(path, "does not hold a dict of named tensors")
    return state
