"""The files of batch completion: the prompt file it reads, and the JSONL output it writes exactly once per id.

The prompt file: ``.txt`` (one prompt per line) or ``.jsonl`` records, read into Records (malformed lines are
returned with the reason, not raised; duplicate ids are an error, as resuming goes by id).
``OUT`` holds one record per finished prompt (appended, flushed and fsynced as they finish: a rerun skips them,
a torn last line is dropped); a data-parallel replica appends to ``OUT.part-<replica>`` instead and rank 0 merges
the parts into OUT. ``OUT.meta.json`` records the model and the settings OUT was made with, so a rerun with other
ones stops (unless forced) instead of mixing outputs. OUT exists only while it holds a record (or a run holds it).
"""

import fcntl
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_gen.apps.flags import SETTINGS, sampling_settings
from llama_gen.devices import resolve_dtype

META_SUFFIX = ".meta.json"
KNOWN_KEYS = {"id", "prompt", "dialog", *SETTINGS}


@dataclass
class Record:
    id: Any  # as given in the input (an int line number for .txt)
    line: int
    prompt: str | None = None
    dialog: list | None = None
    settings: dict = field(default_factory=dict)
    n_tokens: int = 0

    @property
    def key(self) -> str:
        """Returns the id as canonical JSON (so 1 and "1" stay different ids)."""
        return json.dumps(self.id)

    @property
    def kind(self) -> str:
        return "prompt" if self.prompt is not None else "dialog"


# ---- reading the input ------------------------------------------------------------------------------


def parse_jsonl_line(text: str, line: int, unknown: set) -> Record:
    """Returns the Record on one JSONL line; raises ValueError saying what is wrong with it."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    rid = obj.get("id", line)
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise ValueError(f"id must be a string or an integer, got {rid!r}")
    if ("prompt" in obj) == ("dialog" in obj):
        raise ValueError('needs exactly one of "prompt" (text completion) or "dialog" (chat)')
    if "prompt" in obj and not isinstance(obj["prompt"], str):
        raise ValueError(f"prompt must be a string, got {type(obj['prompt']).__name__}")
    if "dialog" in obj and (not isinstance(obj["dialog"], list) or not obj["dialog"]):
        raise ValueError('dialog must be a non-empty list of {"role": ..., "content": ...} messages')
    settings = sampling_settings(obj)  # raises ValueError naming a bad setting
    unknown.update(set(obj) - KNOWN_KEYS)
    return Record(rid, line, obj.get("prompt"), obj.get("dialog"), settings)


def read_prompts(path: Path) -> tuple[list[Record], list[tuple[int, str]], set]:
    """Returns (records, malformed lines as (line number, reason), unknown field names) of a .txt or .jsonl file."""
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"{path}: prompt files must end in .txt (one prompt per line) or .jsonl")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found")
    records, bad, unknown = [], [], set()
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                bad.append((number, f"not UTF-8 ({e})"))
                continue
            if not text.strip():
                continue
            if path.suffix == ".txt":
                records.append(Record(number, number, prompt=text))
                continue
            try:
                records.append(parse_jsonl_line(text, number, unknown))
            except ValueError as e:
                bad.append((number, str(e)))
    return records, bad, unknown


def check_duplicates(records: list[Record], path: Path) -> None:
    """Raises ValueError listing ids that occur more than once (with their line numbers)."""
    lines: dict[str, list[int]] = {}
    for r in records:
        lines.setdefault(r.key, []).append(r.line)
    dups = {k: v for k, v in lines.items() if len(v) > 1}
    if dups:
        shown = "; ".join(f"id {k} on lines {', '.join(map(str, v))}" for k, v in list(dups.items())[:5])
        more = f" (and {len(dups) - 5} more)" if len(dups) > 5 else ""
        raise ValueError(f"{path}: {len(dups)} duplicate ids: {shown}{more}; ids must be unique for resuming")


def input_output(prompts: str, output: str | None) -> tuple[Path, Path]:
    """Returns (the prompt file, the output file); raises ValueError when the output would overwrite the input."""
    path = Path(str(prompts))
    out = Path(str(output)) if output is not None else path.with_name(path.stem + ".out.jsonl")
    if out.resolve() == path.resolve():
        raise ValueError(f"--output {out} would overwrite the prompt file")
    return path, out


# ---- the output file ----------------------------------------------------------------------------------


def read_output(path: Path, repair: bool) -> dict[str, dict]:
    """Returns {id key: record} of a JSONL output; a torn last line (from a kill) is dropped, and with repair
    also cut from the file. Raises ValueError on a damaged line elsewhere."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        if repair:
            with open(path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        data = data[:end]
    done = {}
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
            done[json.dumps(obj["id"])] = obj
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}:{number} is not an output record; fix or remove that line, then rerun") from None
    return done


def append_lines(f, objs: list[dict]) -> None:
    """Appends objs as JSON lines to the open file f, then flushes and fsyncs it; returns None."""
    f.write("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs))
    f.flush()
    os.fsync(f.fileno())


def part_paths(output: Path) -> list[Path]:
    """Returns the per-replica part files of output that exist."""
    return sorted(output.parent.glob(output.name + ".part-*"))


def merge_parts(output: Path) -> int:
    """Appends the records of output's part files that output lacks, then deletes the parts; returns how many."""
    done = read_output(output, repair=True)
    added = 0
    with open(output, "a", encoding="utf-8") as f:
        for part in part_paths(output):
            new = [obj for key, obj in read_output(part, repair=False).items() if key not in done]
            append_lines(f, new)
            done.update((json.dumps(o["id"]), o) for o in new)
            added += len(new)
    for part in part_paths(output):
        part.unlink()
    return added


def sort_output(output: Path, order: list[str]) -> None:
    """Rewrites output in input order (unknown ids last) through an atomic rename; returns None."""
    done = read_output(output, repair=True)
    rank = {key: i for i, key in enumerate(order)}
    keys = list(done)
    ordered = sorted(keys, key=lambda k: rank.get(k, len(order)))
    if ordered == keys:
        return
    tmp = output.with_name(output.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        append_lines(f, [done[k] for k in ordered])
    os.replace(tmp, output)


def lock_output(output: Path):
    """Returns the open output file, exclusively locked so two runs cannot write it at once."""
    output.parent.mkdir(parents=True, exist_ok=True)
    while True:
        f = open(output, "a", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise ValueError(f"another run is writing {output}; wait for it or choose another --output") from None
        try:
            if os.stat(output).st_ino == os.fstat(f.fileno()).st_ino:
                return f
        except FileNotFoundError:
            pass
        f.close()  # the run that held it removed it (it had no record) after we opened it: lock the new one


def discard_if_empty(output: Path) -> bool:
    """Removes output and its sidecar when output holds no record and no part file is left (call it while holding
    the lock); returns whether it did."""
    if part_paths(output) or (output.is_file() and output.stat().st_size > 0):
        return False
    output.unlink(missing_ok=True)
    meta_path(output).unlink(missing_ok=True)
    return True


# ---- the sidecar: the model and settings an output was made with ---------------------------------------------


def meta_path(output: Path) -> Path:
    return output.with_name(output.name + META_SUFFIX)


def file_digest(path: Path) -> str | None:
    """Returns the sha256 of a file's bytes, or None when there is no such file."""
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def model_identity(ckpt_dir: Path, tokenizer_path: str | None) -> dict:
    """Returns what identifies a checkpoint cheaply: its directory, the digests of params.json and
    generation_config.json (its sampling defaults), the total size of its weight shards, and the tokenizer."""
    return {
        "ckpt_dir": str(ckpt_dir.resolve()),
        "params_sha256": file_digest(ckpt_dir / "params.json"),
        "weights_bytes": sum(p.stat().st_size for p in ckpt_dir.glob("consolidated.*.pth")),
        "generation_config_sha256": file_digest(ckpt_dir / "generation_config.json"),
        "tokenizer_path": None if tokenizer_path is None else str(Path(tokenizer_path).resolve()),
    }


def read_meta(output: Path) -> dict | None:
    """Returns output's sidecar, or None when it has none; raises ValueError when it is damaged."""
    path = meta_path(output)
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict) or "settings" not in meta:
        raise ValueError(f"{path} is damaged; delete it (and check {output} is what you expect), then rerun")
    return meta


def write_meta(output: Path, meta: dict) -> None:
    """Writes output's sidecar atomically (a temporary file renamed over it); returns None."""
    path = meta_path(output)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def differences(old: dict, new: dict) -> list[str]:
    """Returns 'section.name: old -> new' for each model field or setting that differs between two sidecars."""
    diffs = []
    for section in ("model", "settings"):
        before, now = old.get(section) or {}, new[section]
        for name in sorted(set(before) | set(now)):
            if before.get(name) != now.get(name):
                diffs.append(f"{section}.{name}: {json.dumps(before.get(name))} -> {json.dumps(now.get(name))}")
    return diffs


def check_meta(output: Path, meta: dict, n_records: int, force: bool) -> None:
    """Checks that output (holding n_records) was made with the model and settings of meta, and records them in
    its sidecar; raises ValueError listing what differs (unless force: then the sidecar keeps the old ones under
    "earlier" and the run goes on). Returns None."""
    if n_records == 0:  # nothing made yet: whatever a sidecar says no longer matters
        write_meta(output, meta)
        return
    old = read_meta(output)
    if old is None:
        print(
            f"{output}: has {n_records} records but no {meta_path(output).name} (made by an older version?): "
            "cannot check the model and settings they were made with; recording these",
            file=sys.stderr,
        )
        write_meta(output, meta)
        return
    diffs = differences(old, meta)
    if not diffs:
        return
    if not force:
        raise ValueError(
            f"{output} ({n_records} records) was made with another model or other settings ({'; '.join(diffs)}): "
            "rerun with the same ones, choose another --output, or pass --force to go on with these "
            "(the records already written stay as they are)"
        )
    print(f"{output}: --force: going on with other settings ({'; '.join(diffs)})", file=sys.stderr)
    earlier = old.pop("earlier", [])
    write_meta(output, {**meta, "earlier": [*earlier, old]})


def run_meta(values: dict, defaults: dict) -> dict:
    """Returns the sidecar of this run: the model, and every setting its records depend on (the sampling flags
    given, --seed, and the flags that change what the model computes)."""
    dtype = str(resolve_dtype(values["dtype"], values["device"])).removeprefix("torch.")
    settings = {**defaults, "seed": values["seed"], "dtype": dtype}
    settings.update((k, values[k]) for k in ("max_seq_len", "quantize", "chat_format", "logprobs"))
    return {"model": model_identity(values["ckpt_dir"], values["tokenizer_path"]), "settings": settings}
