"""Batch completion of a prompt file into a resumable JSONL output.

    python scripts/complete.py PROMPTS.jsonl [--output OUT.jsonl] [--max_batch_size 8] [--temperature 0] [--logprobs]
    torchrun --nproc_per_node 4 scripts/complete.py PROMPTS.jsonl --model_parallel_size 2   # 2 replicas of 2 ranks

Input: ``.txt`` (one prompt per line, id = line number; blank lines ignored) or ``.jsonl`` records
``{"id": ..., "prompt": "..."}`` (text completion) or ``{"id": ..., "dialog": [...]}`` (chat), each optionally
with its own temperature, top_p, top_k, min_p, repetition_penalty, max_gen_len, stop, seed (a missing id is
the line number). Records with the same settings share batches; within those, prompts of similar length do.

Output (default: ``PROMPTS.out.jsonl`` next to the input): one line per prompt with id, generation,
finish_reason, prompt_tokens, completion_tokens (and tokens, logprobs with --logprobs). Each batch's lines are
written, flushed and fsynced when it finishes, so rerunning the same command after a crash or ``kill -9``
skips the ids already written (a torn last line is dropped) and every prompt ends up exactly once.

Data parallel: with W processes and model_parallel_size M there are W/M replicas; the pending batches are
dealt round-robin, each replica's first rank appends to ``OUT.part-<replica>``, and rank 0 merges the parts
into OUT at the end (and at the start of a rerun, which is how parts left by a crash are resumed).
"""

import fcntl
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist
from tqdm import tqdm

from llama_gen import parallel
from llama_gen.apps.errors import friendly_errors
from llama_gen.apps.flags import (
    MODEL_FLAGS,
    REQUIRED,
    SAMPLING_FLAGS,
    SETTINGS,
    STOP_FLAG,
    Flag,
    check_model_flags,
    check_sampling_flags,
    model_flags,
    sampling_settings,
    select,
    takes,
)
from llama_gen.devices import resolve_device
from llama_gen.generation import Llama

KNOWN_KEYS = {"id", "prompt", "dialog", *SETTINGS}
FILE_FLAGS = (
    Flag("prompts", REQUIRED, str, ".txt file (one prompt per line) or .jsonl file of prompt or dialog records"),
    Flag("output", None, str | None, "the JSONL output (default: PROMPTS.out.jsonl next to the input)"),
)
OUTPUT_FLAGS = (
    Flag("logprobs", False, bool, "also write each generated token and its logprob"),
    Flag("strict", False, bool, "stop before any compute when a line is malformed (default: skip it)"),
)


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
    f = open(output, "a", encoding="utf-8")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ValueError(f"another run is writing {output}; wait for it or choose another --output") from None
    return f


# ---- batching ----------------------------------------------------------------------------------------


def encode_records(llama, records: list[Record], chat_format: str | None) -> list[tuple[int, str]]:
    """Fills each record's n_tokens; returns (line, reason) for records the model cannot take (they are removed)."""
    max_seq_len = llama.model.args.max_seq_len
    bad, keep = [], []
    for r in records:
        try:
            if r.kind == "prompt":
                tokens = llama.encode_prompt(r.prompt)
            else:
                tokens = llama.encode_dialog(r.dialog, chat_format)
        except ValueError as e:
            bad.append((r.line, str(e)))
            continue
        if not tokens or len(tokens) > max_seq_len:
            bad.append((r.line, f"prompt has {len(tokens)} tokens; it must have 1 to max_seq_len={max_seq_len}"))
            continue
        r.n_tokens = len(tokens)
        keep.append(r)
    records[:] = keep
    return bad


def make_batches(records: list[Record], defaults: dict, max_batch_size: int) -> list[tuple[dict, list[Record]]]:
    """Returns (settings, records) batches: same kind and settings per batch, sorted by prompt length."""
    groups: dict[str, tuple[dict, list[Record]]] = {}
    for r in records:
        settings = {**defaults, **r.settings, "kind": r.kind}
        key = json.dumps(settings, sort_keys=True)
        groups.setdefault(key, (settings, []))[1].append(r)
    batches = []
    for settings, group in groups.values():
        group.sort(key=lambda r: (r.n_tokens, r.line))
        batches += [(settings, group[i : i + max_batch_size]) for i in range(0, len(group), max_batch_size)]
    return batches


def run_batch(llama, settings: dict, batch: list[Record], chat_format: str | None, logprobs: bool) -> list[dict]:
    """Returns the output records of one batch."""
    kw = {k: v for k, v in settings.items() if k != "kind"}
    if settings["kind"] == "prompt":
        preds = llama.text_completion([r.prompt for r in batch], logprobs=logprobs, **kw)
        texts = [p["generation"] for p in preds]
    else:
        preds = llama.chat_completion([r.dialog for r in batch], logprobs=logprobs, chat_format=chat_format, **kw)
        texts = [p["generation"]["content"] for p in preds]
    out = []
    for r, p, text in zip(batch, preds, texts):
        obj = {
            "id": r.id,
            "generation": text,
            "finish_reason": p["finish_reason"],
            "prompt_tokens": p["prompt_tokens"],
            "completion_tokens": p["completion_tokens"],
        }
        if logprobs:
            obj.update(tokens=p["tokens"], logprobs=p["logprobs"])
        out.append(obj)
    return out


# ---- distributed helpers ----------------------------------------------------------------------------


def data_parallel() -> tuple[int, int, bool]:
    """Returns (replica index, number of replicas, whether this rank writes its replica's results)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1, True
    if hasattr(parallel, "data_parallel_rank") and hasattr(parallel, "data_parallel_world_size"):
        dp_rank, dp_world = parallel.data_parallel_rank(), parallel.data_parallel_world_size()
    else:
        from fairscale.nn.model_parallel import initialize as fs_init

        dp_rank, dp_world = fs_init.get_data_parallel_rank(), fs_init.get_data_parallel_world_size()
    return dp_rank, dp_world, parallel.model_parallel_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def global_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def report(path: Path, bad: list[tuple[int, str]]) -> None:
    """Prints one 'file:line: reason' per malformed record to stderr (rank 0 only); returns None."""
    if global_rank() == 0:
        for line, reason in bad:
            print(f"{path}:{line}: skipped: {reason}", file=sys.stderr)


def complete_share(
    llama, batches: list[tuple[dict, list[Record]]], out: Path, main_file, chat_format: str | None, logprobs: bool
) -> tuple[int, int]:
    """Runs this replica's share of the batches (round-robin), appending each batch's lines as it finishes;
    returns (prompts written, prompts whose batch failed)."""
    dp_rank, dp_world, writer = data_parallel()
    mine = batches[dp_rank::dp_world]
    target = out if dp_world == 1 else out.with_name(f"{out.name}.part-{dp_rank}")
    sink = None
    if writer:
        sink = main_file if dp_world == 1 else open(target, "a", encoding="utf-8")
    written = failed = n_tokens = 0
    start = time.time()
    bar = tqdm(
        total=sum(len(b) for _, b in mine),
        desc="complete" if dp_world == 1 else f"replica 0/{dp_world}",
        unit="prompt",
        file=sys.stderr,
        disable=global_rank() != 0,
        dynamic_ncols=True,
    )
    for settings, batch in mine:
        try:
            objs = run_batch(llama, settings, batch, chat_format, logprobs)
        except KeyboardInterrupt:
            bar.close()
            print(
                f"interrupted after {written} prompts (all written to {target}); rerun the same command "
                "to finish the rest",
                file=sys.stderr,
            )
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 - report and go on; a rerun retries these ids
            if parallel.model_parallel_world_size() > 1:
                raise  # the other ranks of this replica are mid-collective: stopping is the only safe move
            failed += len(batch)
            print(f"batch of ids {[r.id for r in batch][:8]} failed: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        if sink is not None:
            append_lines(sink, objs)
        written += len(objs)
        n_tokens += sum(o["completion_tokens"] for o in objs)
        bar.update(len(objs))
        bar.set_postfix_str(f"{n_tokens / max(time.time() - start, 1e-9):.1f} tok/s", refresh=False)
    bar.close()
    if sink is not None and sink is not main_file:
        sink.close()
    return (written, failed) if writer else (0, 0)


def sum_over_writers(written: int, failed: int) -> tuple[int, int]:
    """Returns the totals of (written, failed) over all ranks (each replica counted once by its writer)."""
    if not (dist.is_available() and dist.is_initialized()):
        return written, failed
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (written, failed))
    return sum(g[0] for g in gathered), sum(g[1] for g in gathered)


def input_output(prompts: str, output: str | None) -> tuple[Path, Path]:
    """Returns (the prompt file, the output file); raises ValueError when the output would overwrite the input."""
    path = Path(str(prompts))
    out = Path(str(output)) if output is not None else path.with_name(path.stem + ".out.jsonl")
    if out.resolve() == path.resolve():
        raise ValueError(f"--output {out} would overwrite the prompt file")
    return path, out


def read_input(path: Path, strict: bool) -> tuple[list[Record], list[tuple[int, str]], set]:
    """Returns read_prompts(path); raises ValueError on duplicate ids, and with strict on a malformed line."""
    records, bad, unknown = read_prompts(path)
    check_duplicates(records, path)
    if strict and bad:
        report(path, bad)
        raise ValueError(f"{path}: {len(bad)} malformed lines (first: line {bad[0][0]}); fix them or drop --strict")
    return records, bad, unknown


def open_output(out: Path):
    """Returns (the locked output file on rank 0, else None; {id key: record} already done), once every rank
    is here; rank 0 first merges the part files a crashed data-parallel run left."""
    lock = None
    if global_rank() == 0:
        lock = lock_output(out)
        merge_parts(out)
    barrier()
    return lock, read_output(out, repair=False)


def encode_or_fail(llama, pending: list[Record], path: Path, values: dict) -> list[tuple[int, str]]:
    """Returns encode_records' (line, reason) list; with --strict raises ValueError if it is not empty."""
    bad = encode_records(llama, pending, values["chat_format"])
    if values["strict"] and bad:
        report(path, bad)
        raise ValueError(f"{path}: {len(bad)} prompts the model cannot take; fix them or drop --strict")
    return bad


def close_output(out: Path, records: list[Record], lock) -> None:
    """Merges the replicas' parts into out, puts it in input order and releases the lock (rank 0); returns None."""
    merge_parts(out)
    sort_output(out, [r.key for r in records])
    lock.close()


@friendly_errors
@takes(FILE_FLAGS, select(MODEL_FLAGS, max_batch_size=8), SAMPLING_FLAGS, [STOP_FLAG], OUTPUT_FLAGS)
def main(values: dict) -> None:
    """Completes every prompt of a .txt/.jsonl file not yet in the output; prints a summary, returns None.

    Command-line sampling settings are defaults that each JSONL record may override (left out: the
    checkpoint's generation_config.json, then the library defaults). --seed seeds the run; a record's
    "seed" seeds its batch. --strict stops before any compute when a line is malformed.
    Exits with status 1 when a batch failed (rerun to retry it).
    """
    path, out = input_output(values["prompts"], values["output"])
    check_model_flags(values)
    defaults = check_sampling_flags(values)
    records, bad, unknown = read_input(path, values["strict"])
    device = resolve_device(values["device"])
    parallel.init_distributed(values["model_parallel_size"], device)
    lock, done = open_output(out)
    pending = [r for r in records if r.key not in done]
    n_already = len(records) - len(pending)
    start = time.time()
    written = failed = 0
    if pending:
        llama = Llama.build(**{**model_flags(values), "device": device})
        bad = sorted(bad + encode_or_fail(llama, pending, path, values))
    report(path, bad)
    if unknown and global_rank() == 0:
        print(f"{path}: ignored unknown fields {sorted(unknown)}", file=sys.stderr)
    if pending:
        batches = make_batches(pending, defaults, values["max_batch_size"])
        written, failed = complete_share(llama, batches, out, lock, values["chat_format"], values["logprobs"])
    written, failed = sum_over_writers(written, failed)
    if global_rank() == 0:
        close_output(out, records, lock)
        print(
            f"{path}: {written} done, {n_already} already done, {len(bad)} skipped (malformed), "
            f"{failed} failed -> {out} ({time.time() - start:.1f} s)",
            file=sys.stderr,
        )
    parallel.shutdown_distributed()
    if failed:
        sys.exit(1)
