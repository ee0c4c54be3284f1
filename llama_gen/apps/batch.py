"""Batch completion of a prompt file into a resumable JSONL output.

    python scripts/complete.py PROMPTS.jsonl [--output OUT.jsonl] [--max_batch_size 8] [--temperature 0] [--logprobs]
    torchrun --nproc_per_node 4 scripts/complete.py PROMPTS.jsonl --model_parallel_size 2   # 2 replicas of 2 ranks

Input: ``.txt`` (one prompt per line, id = line number; blank lines ignored) or ``.jsonl`` records
``{"id": ..., "prompt": "..."}`` (text completion) or ``{"id": ..., "dialog": [...]}`` (chat), each optionally
with its own temperature, top_p, top_k, min_p, repetition_penalty, max_gen_len, stop, seed (a missing id is
the line number). Malformed lines, and prompts longer than --max_seq_len, are reported and skipped (--strict:
the run stops before any compute).

Running: every record goes to a serving engine (llama_gen.serve): continuous batching, where records with any
settings share each decode step and a finished record's row takes the next at once. With model parallel (several
ranks per replica) the replica's first rank runs the engine and the others make the same model calls.

Exact resume: a record that samples draws from its own generator, seeded by its "seed", else by a hash of the
run's --seed and its id, so its output depends only on the record, its settings and --seed (not on which records
ran with it or before it): a run killed and rerun writes what an uninterrupted run writes.

Output (default: ``PROMPTS.out.jsonl`` next to the input): one line per prompt with id, generation,
finish_reason, prompt_tokens, completion_tokens (and tokens, logprobs with --logprobs). Each line is written,
flushed and fsynced as its prompt finishes, so rerunning the same command after a crash or ``kill -9`` skips the
ids already written (a torn last line is dropped) and every prompt ends up exactly once; at the end the output is
put in input order. ``OUT.meta.json`` records the model (checkpoint directory, params.json digest, weights size,
tokenizer) and the settings (sampling flags given, --seed, --max_seq_len, dtype, quantize, chat_format,
logprobs) it was made with: a rerun with others says which differ and stops with status 2, before any work,
unless ``--force`` (then the records already written stay, the rest are made with the new ones, and the sidecar
keeps the old ones under "earlier"). A run that writes no record leaves neither file.

Data parallel: with W processes and model_parallel_size M there are W/M replicas; the pending records are
dealt round-robin, each replica's first rank appends to ``OUT.part-<replica>``, and rank 0 merges the parts
into OUT at the end (and at the start of a rerun, which is how parts left by a crash are resumed).
"""

import functools
import hashlib
import json
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from itertools import islice
from pathlib import Path
from typing import Any

import torch.distributed as dist
from tqdm import tqdm

from llama_gen import parallel
from llama_gen.apps import flags
from llama_gen.apps.batch_files import (
    Record,
    append_lines,
    check_duplicates,
    check_meta,
    discard_if_empty,
    input_output,
    lock_output,
    merge_parts,
    read_output,
    read_prompts,
    run_meta,
    sort_output,
)
from llama_gen.apps.errors import friendly_errors
from llama_gen.apps.flags import COMPILE_AUTO, MODEL_FLAGS, REQUIRED, SAMPLING_FLAGS, STOP_FLAG, Flag, select, takes
from llama_gen.devices import resolve_device
from llama_gen.generation import Llama
from llama_gen.options import GenerationOptions
from llama_gen.serve import Engine
from llama_gen.serve.ranks import follow, schedules
from llama_gen.serve.threads import on_passing_thread

FILE_FLAGS = (
    Flag("prompts", REQUIRED, str, ".txt file (one prompt per line) or .jsonl file of prompt or dialog records"),
    Flag("output", None, str | None, "the JSONL output (default: PROMPTS.out.jsonl next to the input)"),
)
OUTPUT_FLAGS = (
    Flag("logprobs", False, bool, "also write each generated token and its logprob"),
    Flag("strict", False, bool, "stop before any compute when a line is malformed or too long (default: skip it)"),
    Flag(
        "force",
        False,
        bool,
        "go on with an output made with another model or other settings (OUT.meta.json says which): the records "
        "already written stay as they are",
    ),
)


# ---- settings and seeds ------------------------------------------------------------------------------


def encode_records(llama, records: list[Record], chat_format: str | None) -> tuple[list, list]:
    """Fills each record's n_tokens; returns (malformed, too long): the (line, reason) of each record the model
    cannot take (they are removed from records)."""
    max_seq_len = llama.model.args.max_seq_len
    bad, too_long, keep = [], [], []
    for r in records:
        try:
            if r.kind == "prompt":
                tokens = llama.encode_prompt(r.prompt)
            else:
                tokens = llama.encode_dialog(r.dialog, chat_format)
        except ValueError as e:
            bad.append((r.line, str(e)))
            continue
        if not tokens:
            bad.append((r.line, "the prompt encodes to no token"))
        elif len(tokens) > max_seq_len:
            reason = (
                f"prompt has {len(tokens)} tokens but max_seq_len is {max_seq_len}: shorten it, or raise --max_seq_len"
            )
            too_long.append((r.line, reason))
        else:
            r.n_tokens = len(tokens)
            keep.append(r)
    records[:] = keep
    return bad, too_long


def record_seed(run_seed: int, rid: Any) -> int:
    """Returns the seed of a record that has none: a hash of the run's --seed and the record's id only, in
    [0, 2**63) (torch.Generator's range), so its output does not depend on what ran with it or before it."""
    digest = hashlib.sha256(json.dumps([run_seed, rid]).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def record_settings(r: Record, defaults: dict, run_seed: int, config: dict) -> dict:
    """Returns record r's generation settings: its own, else the command line's (defaults), with its seed (its own,
    else record_seed) when it samples; a greedy record has none (it draws nothing). config: the checkpoint's
    generation_config (its defaults decide whether a record samples)."""
    settings = {**defaults, **r.settings}
    if GenerationOptions(**settings).sampling(config).temperature == 0:
        settings.pop("seed", None)
    else:
        settings.setdefault("seed", record_seed(run_seed, r.id))
    return settings


def output_record(rid: Any, text: str, pred: dict, tokens: list[str] | None) -> dict:
    """Returns the output line of one record (pred: finish_reason, prompt_tokens, completion_tokens, logprobs)."""
    obj = {"id": rid, "generation": text}
    obj.update((k, pred[k]) for k in ("finish_reason", "prompt_tokens", "completion_tokens"))
    if tokens is not None:
        obj.update(tokens=tokens, logprobs=pred["logprobs"])
    return obj


# ---- the serving engine (a model on one rank) ----------------------------------------------------------------


def submit_record(engine: Engine, r: Record, settings: dict, chat_format: str | None, logprobs: bool):
    """Returns the handle of record r's request to engine."""
    if r.kind == "prompt":
        return engine.submit_text(r.prompt, logprobs=logprobs, **settings)
    return engine.submit_chat(r.dialog, chat_format=chat_format, logprobs=logprobs, **settings)


def engine_outcome(handle, rid: Any, tokenizer, logprobs: bool) -> dict | Exception:
    """Waits for one request; returns its output record, or the error it failed with."""
    try:
        done = handle.result()
    except Exception as e:  # noqa: BLE001 - this record fails alone; a rerun retries it
        return e
    tokens = [tokenizer.decode([t]) for t in done.tokens] if logprobs else None
    return output_record(rid, done.text, vars(done), tokens)


def run_on_engine(llama: Llama, records: list[Record], settings_of: Callable, run: dict, on_done: Callable) -> None:
    """Runs records on a serving engine (continuous batching: every record with its own settings and seed, all
    sharing each decode step, a finished one's row refilled at once); calls on_done with the (record, output
    record or error) pairs of the records that finish, as they do. run: the chat_format and logprobs flags."""
    window = 2 * llama.model.args.max_batch_size + 2  # requests in the engine: every row busy, more waiting
    todo = iter(records)
    with (
        ThreadPoolExecutor(window, "complete") as pool,
        Engine(llama, max_queue=window, compile_in_background=flags.compile_in_background(run)) as engine,
    ):
        running: dict[Future, Record] = {}
        while True:
            for r in islice(todo, window - len(running)):
                try:
                    handle = submit_record(engine, r, settings_of(r), run["chat_format"], run["logprobs"])
                except Exception as e:  # noqa: BLE001 - this record fails alone
                    on_done([(r, e)])
                    continue
                running[pool.submit(engine_outcome, handle, r.id, llama.tokenizer, run["logprobs"])] = r
            if not running:
                return
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            on_done(sorted(((running.pop(f), f.result()) for f in finished), key=lambda pair: pair[0].line))


# ---- distributed helpers ----------------------------------------------------------------------------


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def data_parallel() -> tuple[int, int, bool]:
    """Returns (replica index, number of replicas, whether this rank writes its replica's results)."""
    if not distributed():
        return 0, 1, True
    return parallel.data_parallel_rank(), parallel.data_parallel_world_size(), parallel.model_parallel_rank() == 0


def global_rank() -> int:
    return dist.get_rank() if distributed() else 0


def on_rank0(fn: Callable[[], Any]) -> Any:
    """Returns fn() on rank 0 (None on the other ranks), once every rank is here; when it raises, every rank
    raises (rank 0 its error, the others a ValueError saying the same)."""
    result, error = None, None
    if global_rank() == 0:
        try:
            result = fn()
        except Exception as e:
            error = e
    if distributed():
        box = [None if error is None else str(error)]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and error is None:
            raise ValueError(box[0])
    if error is not None:
        raise error
    return result


def report(path: Path, bad: list[tuple[int, str]]) -> None:
    """Prints one 'file:line: skipped: reason' per record left out to stderr (rank 0 only); returns None."""
    if global_rank() == 0:
        for line, reason in sorted(bad):
            print(f"{path}:{line}: skipped: {reason}", file=sys.stderr)


class ShareWriter:
    """Appends one replica's finished records to OUT (or its part file, opened at its first record) as they
    finish, counts them and shows the progress (prompts done, tok/s); called with (record, output or error) pairs."""

    def __init__(self, out: Path, main_file, total: int):
        dp_rank, dp_world, self.writes = data_parallel()
        self.target = out if dp_world == 1 else out.with_name(f"{out.name}.part-{dp_rank}")
        self.main_file = self.sink = main_file if dp_world == 1 else None
        self.written = self.failed = self.n_tokens = 0
        self.start = time.time()
        desc = "complete" if dp_world == 1 else f"replica 0/{dp_world}"
        self.bar = tqdm(total=total, desc=desc, unit="prompt", file=sys.stderr, disable=global_rank() != 0)

    def __call__(self, results: list[tuple[Record, dict | Exception]]) -> None:
        objs = [obj for _, obj in results if isinstance(obj, dict)]
        for r, error in results:
            if isinstance(error, Exception):
                tqdm.write(f"id {json.dumps(r.id)} failed: {type(error).__name__}: {error}", file=sys.stderr)
                self.failed += 1
        if objs and self.writes:
            if self.sink is None:
                self.sink = open(self.target, "a", encoding="utf-8")
            append_lines(self.sink, objs)
        self.written += len(objs)
        self.n_tokens += sum(o["completion_tokens"] for o in objs)
        self.bar.update(len(results))
        self.bar.set_postfix_str(f"{self.n_tokens / max(time.time() - self.start, 1e-9):.1f} tok/s", refresh=False)

    def close(self) -> None:
        self.bar.close()
        if self.sink is not None and self.sink is not self.main_file:
            self.sink.close()


def complete_share(llama, pending: list[Record], out: Path, main_file, settings_of: Callable, run: dict):
    """Runs this replica's share of the pending records (round-robin) on a serving engine (with model parallel, on
    the replica's first rank, which the others follow), appending each record's line as it finishes; returns
    (prompts written, prompts failed) on the ranks that write, else (0, 0)."""
    dp_rank, dp_world, writes = data_parallel()
    mine = pending[dp_rank::dp_world]
    writer = ShareWriter(out, main_file, len(mine))
    try:
        if schedules():
            run_on_engine(llama, mine, settings_of, run, writer)
        else:  # the other ranks of a model split over several: the first one's engine decides every model call
            follow(llama)
    except KeyboardInterrupt:
        writer.close()
        print(
            f"interrupted after {writer.written} prompts (all written to {writer.target}); rerun the same command "
            "to finish the rest",
            file=sys.stderr,
        )
        sys.exit(130)
    writer.close()
    return (writer.written, writer.failed) if writes else (0, 0)


def sum_over_writers(written: int, failed: int) -> tuple[int, int]:
    """Returns the totals of (written, failed) over all ranks (each replica counted once by its writer)."""
    if not distributed():
        return written, failed
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (written, failed))
    return sum(g[0] for g in gathered), sum(g[1] for g in gathered)


# ---- the run ------------------------------------------------------------------------------------------


def read_input(path: Path, strict: bool) -> tuple[list[Record], list[tuple[int, str]], set]:
    """Returns read_prompts(path); raises ValueError on duplicate ids, and with strict on a malformed line."""
    records, bad, unknown = read_prompts(path)
    check_duplicates(records, path)
    if strict and bad:
        report(path, bad)
        raise ValueError(f"{path}: {len(bad)} malformed lines (first: line {bad[0][0]}); fix them or drop --strict")
    return records, bad, unknown


def checkpoint_dir(ckpt_dir: Any) -> Path:
    """Returns the checkpoint directory to load: ckpt_dir, else the default model's (converted on first use)."""
    if ckpt_dir is None:
        from llama_gen.convert import ensure_default_model

        return Path(ensure_default_model())
    return Path(str(ckpt_dir)).expanduser()


def open_output(out: Path, meta: Callable[[], dict], force: bool):
    """Returns the locked output file on rank 0 (else None), once every rank is here: rank 0 first merges the part
    files a crashed data-parallel run left and checks that what is written was made with this run's model and
    settings (ValueError unless force); OUT.meta.json records them."""

    def prepare():
        lock = lock_output(out)
        try:
            merge_parts(out)
            check_meta(out, meta(), len(read_output(out, repair=False)), force)
        except BaseException:
            discard_if_empty(out)
            lock.close()
            raise
        return lock

    return on_rank0(prepare)


def encode_or_fail(llama, pending: list[Record], path: Path, values: dict) -> tuple[list, list]:
    """Returns encode_records' (malformed, too long) lists; with --strict raises ValueError if either is not empty."""
    bad, too_long = encode_records(llama, pending, values["chat_format"])
    if values["strict"] and (bad or too_long):
        report(path, bad + too_long)
        raise ValueError(
            f"{path}: {len(bad) + len(too_long)} prompts the model cannot take ({len(too_long)} too long); "
            "fix them or drop --strict"
        )
    return bad, too_long


def complete_pending(values: dict, defaults: dict, path: Path, out: Path, lock, pending: list[Record]) -> tuple:
    """Loads the model and completes this replica's share of pending; returns (written, failed) summed over the
    replicas, and the (line, reason) lists of the prompts it left out as malformed and as too long."""
    written = failed = 0
    bad, too_long = [], []
    if pending:
        llama = on_passing_thread(Llama.build, **flags.model_flags(values))  # (why: llama_gen.serve.threads)
        bad, too_long = encode_or_fail(llama, pending, path, values)
        report(path, bad + too_long)
        settings_of = functools.partial(
            record_settings, defaults=defaults, run_seed=values["seed"], config=llama.generation_config
        )
        written, failed = complete_share(llama, pending, out, lock, settings_of, values)
    written, failed = sum_over_writers(written, failed)
    return written, failed, bad, too_long


def close_output(out: Path, records: list[Record], lock) -> None:
    """Merges the replicas' parts into out, puts it in input order (or removes it, and its sidecar, if it holds no
    record) and releases the lock (rank 0); returns None."""
    merge_parts(out)
    sort_output(out, [r.key for r in records])
    discard_if_empty(out)
    lock.close()


@friendly_errors
@takes(
    FILE_FLAGS, select(MODEL_FLAGS, max_batch_size=8, compile=COMPILE_AUTO), SAMPLING_FLAGS, [STOP_FLAG], OUTPUT_FLAGS
)
def main(values: dict) -> None:
    """Completes every prompt of a .txt/.jsonl file not yet in the output; prints a summary, returns None.

    Command-line sampling settings are defaults that each JSONL record may override (left out: the
    checkpoint's generation_config.json, then the library defaults). A record that samples draws from its own
    generator, seeded by its "seed", else by a hash of --seed and its id: its output does not depend on the
    others. --strict stops before any compute when a line is malformed or a prompt too long. A rerun on an output
    made with another model or other settings (OUT.meta.json) stops with status 2 unless --force.
    Exits with status 1 when a prompt failed (rerun to retry it).
    """
    path, out = input_output(values["prompts"], values["output"])
    flags.check_model_flags(values)
    defaults = flags.check_sampling_flags(values)
    records, bad, unknown = read_input(path, values["strict"])
    device = resolve_device(values["device"])
    parallel.init_distributed(values["model_parallel_size"], device)
    values = {**values, "device": device, "ckpt_dir": checkpoint_dir(values["ckpt_dir"])}
    lock = open_output(out, lambda: run_meta(values, defaults), values["force"])
    done = read_output(out, repair=False)
    pending = [r for r in records if r.key not in done]
    n_already = len(records) - len(pending)
    report(path, bad)
    if unknown and global_rank() == 0:
        print(f"{path}: ignored unknown fields {sorted(unknown)}", file=sys.stderr)
    start = time.time()
    try:
        written, failed, bad_prompts, too_long = complete_pending(values, defaults, path, out, lock, pending)
    except BaseException:
        if lock is not None:
            discard_if_empty(out)  # a run that wrote nothing leaves nothing
        raise
    if global_rank() == 0:
        close_output(out, records, lock)
        print(
            f"{path}: {written} done, {n_already} already done, "
            f"{len(bad) + len(bad_prompts)} skipped (malformed), {failed} failed, {len(too_long)} too long -> "
            f"{out if out.is_file() else 'nothing written'} ({time.time() - start:.1f} s)",
            file=sys.stderr,
        )
    parallel.shutdown_distributed()
    if failed:
        sys.exit(1)
