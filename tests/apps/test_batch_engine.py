"""Batch completion on the serving engine: the API's outputs, shared steps, exact resume, the sidecar, model
parallel."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import LLAMA2_TOKENIZER, REPO
from programs import ENV, torchrun
from test_batch import WORDS, args, load, run_main, write_prompts

from llama_gen import Llama
from llama_gen.apps import batch
from llama_gen.apps.batch_files import read_prompts

SAME = ("id", "generation", "finish_reason", "prompt_tokens", "completion_tokens", "tokens")


def write_mixed(path: Path, n: int, seed: int = 0) -> list[dict]:
    """Writes n records of mixed lengths, kinds and settings (greedy and sampled); returns them."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        text = " ".join(rng.choices(WORDS, k=rng.randint(1, 30)))
        rec = {"id": f"m{i}", "prompt": text}
        if i % 4 == 1:
            rec = {"id": f"m{i}", "dialog": [{"role": "user", "content": text}]}
        rec["max_gen_len"] = rng.choice([1, 3, 9, 16, 24])
        if i % 3 == 0:
            rec["temperature"] = 0.8
        if i % 5 == 2:
            rec.update(temperature=1.0, top_k=5)
        if i % 6 == 5:
            rec["repetition_penalty"] = 1.3
        if i % 7 == 6:
            rec["stop"] = ["e"]
        records.append(rec)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def forbid(monkeypatch, name: str) -> None:
    monkeypatch.setattr(batch, name, lambda *a, **k: pytest.fail(f"{name} was used"))


def api_outputs(ckpt, path: Path, defaults: dict, max_seq_len: int) -> list[dict]:
    """Each record of path completed alone through Llama's own text_completion / chat_completion, with the
    settings (and derived seed) the program gives it: what the program must write."""
    llama = Llama.build(
        ckpt, tokenizer_path=str(LLAMA2_TOKENIZER), max_seq_len=max_seq_len, max_batch_size=1, device="cpu",
        dtype="float32",
    )  # fmt: skip
    records, _, _ = read_prompts(path)
    outputs = []
    for r in records:
        settings = batch.record_settings(r, defaults, run_seed=1, config=llama.generation_config)
        if r.kind == "prompt":
            pred = llama.text_completion([r.prompt], logprobs=True, **settings)[0]
            text = pred["generation"]
        else:
            pred = llama.chat_completion([r.dialog], logprobs=True, **settings)[0]
            text = pred["generation"]["content"]
        outputs.append(batch.output_record(r.id, text, pred, pred["tokens"]))
    return outputs


def test_outputs_equal_the_api_one_record_at_a_time(tiny_checkpoints, tmp_path):
    _, ckpt = tiny_checkpoints["gqa"]
    records = write_mixed(tmp_path / "p.jsonl", 24)
    run_main(args(ckpt, tmp_path / "p.jsonl", tmp_path / "engine.jsonl", "--logprobs", max_seq_len=96))
    engine = load(tmp_path / "engine.jsonl")
    expected = api_outputs(ckpt, tmp_path / "p.jsonl", {"max_gen_len": 8, "temperature": 0}, max_seq_len=96)
    assert [r["id"] for r in engine] == [r["id"] for r in records]
    for e, s, rec in zip(engine, expected, records):
        # Greedy records and sampled ones alike: a sampled record's seed is its own on both paths.
        assert {k: e[k] for k in SAME} == {k: s[k] for k in SAME}
        assert e["logprobs"] == pytest.approx(s["logprobs"], abs=1e-4)
        if e["finish_reason"] == "length":
            assert e["completion_tokens"] == rec["max_gen_len"]


def test_mixed_settings_share_steps_and_each_record_is_written_once_as_it_finishes(
    tiny_checkpoints, tmp_path, monkeypatch
):
    _, ckpt = tiny_checkpoints["gqa"]
    records = write_mixed(tmp_path / "p.jsonl", 20, seed=1)
    writes, spans = [], {}
    real_append, real_outcome = batch.append_lines, batch.engine_outcome

    def append(f, objs):
        writes.extend(o["id"] for o in objs)
        real_append(f, objs)

    def outcome(handle, rid, *rest):
        result = real_outcome(handle, rid, *rest)
        spans[rid] = (handle.timings.admitted, handle.timings.finished)
        return result

    monkeypatch.setattr(batch, "append_lines", append)
    monkeypatch.setattr(batch, "engine_outcome", outcome)
    run_main(args(ckpt, tmp_path / "p.jsonl", tmp_path / "o.jsonl", max_seq_len=96))
    ids = [r["id"] for r in records]
    assert sorted(writes) == sorted(ids) and writes != ids  # each once, in the order they finished
    assert [r["id"] for r in load(tmp_path / "o.jsonl")] == ids  # then put in input order
    settings = {
        r["id"]: json.dumps({k: v for k, v in r.items() if k not in ("id", "prompt", "dialog")}) for r in records
    }
    shared = [
        (a, b)
        for a in ids
        for b in ids
        if settings[a] != settings[b] and spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]
    ]
    assert shared, "no two records with different settings were decoded at the same time"


def test_a_resumed_record_samples_what_it_would_have(tiny_checkpoints, tmp_path):
    _, ckpt = tiny_checkpoints["gqa"]
    write_prompts(tmp_path / "p.jsonl", 30, seed=4)
    out = tmp_path / "o.jsonl"
    argv = args(ckpt, tmp_path / "p.jsonl", out, temperature=0.8, max_gen_len=12, max_batch_size=3)
    run_main(argv)
    full = load(out)
    keep = [r for i, r in enumerate(full) if i % 3 == 1]  # as if the others had not been written yet
    out.write_text("".join(json.dumps(r) + "\n" for r in keep))
    run_main(argv)
    assert load(out) == full
    other_seed = tmp_path / "seed2.jsonl"
    run_main(args(ckpt, tmp_path / "p.jsonl", other_seed, temperature=0.8, max_gen_len=12, seed=2))
    assert [r["generation"] for r in load(other_seed)] != [r["generation"] for r in full]


def complete(ckpt, prompts: Path, out: Path, log: Path, **flags) -> subprocess.Popen:
    """Starts scripts/complete.py (its stderr into log)."""
    cmd = [sys.executable, "scripts/complete.py", *args(ckpt, prompts, out, **flags)]
    with open(log, "w") as err:
        return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=err)


def test_kill_9_mid_run_then_resume_writes_what_an_uninterrupted_run_writes(tiny_checkpoints, tmp_path):
    _, ckpt = tiny_checkpoints["gqa"]
    records = write_prompts(tmp_path / "p.jsonl", 80, seed=5)
    flags = dict(temperature=0.8, max_gen_len=16, max_batch_size=3)
    log = tmp_path / "log"
    whole = complete(ckpt, tmp_path / "p.jsonl", tmp_path / "whole.jsonl", log, **flags)
    assert whole.wait(timeout=300) == 0, log.read_text()[-2000:]

    out = tmp_path / "killed.jsonl"
    proc = complete(ckpt, tmp_path / "p.jsonl", out, log, **flags)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 10:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "finished before it could be killed: " + log.read_text()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = len(batch.read_output(out, repair=False))
    assert 10 <= first < 80
    resumed = complete(ckpt, tmp_path / "p.jsonl", out, log, **flags)
    assert resumed.wait(timeout=300) == 0, log.read_text()[-2000:]
    assert f"{80 - first} done, {first} already done" in log.read_text()
    expected, got = load(tmp_path / "whole.jsonl"), load(out)
    assert [r["id"] for r in got] == [r["id"] for r in records]
    for e, g in zip(expected, got):
        assert g == e  # record by record: whichever run, and whichever records ran with it


def meta(out: Path) -> dict:
    return json.loads(out.with_name(out.name + ".meta.json").read_text())


def test_the_output_records_its_model_and_settings_and_a_rerun_with_others_stops(
    tiny_checkpoints, tmp_path, monkeypatch, capsys
):
    _, ckpt = tiny_checkpoints["gqa"]
    _, other_ckpt = tiny_checkpoints["mha"]
    write_prompts(tmp_path / "p.jsonl", 6, dialogs=False)
    out = tmp_path / "o.jsonl"
    run_main(args(ckpt, tmp_path / "p.jsonl", out, max_gen_len=4))
    made = meta(out)
    assert made["model"]["ckpt_dir"] == str(ckpt.resolve()) and made["model"]["weights_bytes"] > 0
    assert made["settings"]["seed"] == 1 and made["settings"]["temperature"] == 0
    before = out.read_text()
    capsys.readouterr()

    forbid(monkeypatch, "Llama")  # stops before any work
    for extra, flags, says in [
        ((), dict(max_gen_len=4, temperature=0.5), "settings.temperature: 0 -> 0.5"),
        ((), dict(max_gen_len=4, seed=7), "settings.seed: 1 -> 7"),
        (("--logprobs",), dict(max_gen_len=4), "settings.logprobs: false -> true"),
    ]:
        with pytest.raises(SystemExit) as e:
            run_main(args(ckpt, tmp_path / "p.jsonl", out, *extra, **flags))
        err = capsys.readouterr().err
        assert e.value.code == 2 and "error: " in err and says in err and "--force" in err
    with pytest.raises(SystemExit) as e:
        run_main(args(other_ckpt, tmp_path / "p.jsonl", out, max_gen_len=4))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "model.params_sha256" in err and "model.ckpt_dir" in err
    assert out.read_text() == before and meta(out) == made
    monkeypatch.undo()

    (tmp_path / "p.jsonl").write_text((tmp_path / "p.jsonl").read_text() + '{"id": "new", "prompt": "more"}\n')
    run_main(args(ckpt, tmp_path / "p.jsonl", out, "--force", max_gen_len=5))
    assert "1 done, 6 already done" in capsys.readouterr().err
    assert out.read_text().startswith(before) and load(out)[-1]["completion_tokens"] == 5
    forced = meta(out)
    assert forced["settings"]["max_gen_len"] == 5 and forced["earlier"] == [made]


def test_an_output_without_a_sidecar_is_resumed_with_a_warning(tiny_checkpoints, tmp_path, capsys):
    _, ckpt = tiny_checkpoints["gqa"]
    write_prompts(tmp_path / "p.jsonl", 4, dialogs=False)
    out = tmp_path / "o.jsonl"
    out.write_text('{"id": "p0", "generation": "from an older version"}\n')
    run_main(args(ckpt, tmp_path / "p.jsonl", out))
    err = capsys.readouterr().err
    assert "no o.jsonl.meta.json" in err and "3 done, 1 already done" in err
    assert meta(out)["settings"]["max_gen_len"] == 8


def test_a_run_that_writes_nothing_leaves_no_file(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    _, ckpt = tiny_checkpoints["gqa"]
    write_prompts(tmp_path / "p.jsonl", 5)
    out = tmp_path / "o.jsonl"
    files = lambda: sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("o.jsonl"))  # noqa: E731

    with pytest.raises(SystemExit) as e:  # the model fails to load
        run_main(args(tmp_path / "missing", tmp_path / "p.jsonl", out))
    assert e.value.code == 2 and "error: " in capsys.readouterr().err and files() == []

    with monkeypatch.context() as m:  # every record fails
        m.setattr(batch, "submit_record", lambda *a: (_ for _ in ()).throw(RuntimeError("out of memory (simulated)")))
        with pytest.raises(SystemExit) as e:
            run_main(args(ckpt, tmp_path / "p.jsonl", out))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "0 done" in err and "5 failed" in err and files() == []

    with monkeypatch.context() as m:  # interrupted before its first record
        m.setattr(batch, "run_on_engine", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(SystemExit) as e:
            run_main(args(ckpt, tmp_path / "p.jsonl", out))
    assert e.value.code == 130 and files() == []

    # A sidecar left with no record (a kill before the first one) does not hold the next run back.
    out.with_name("o.jsonl.meta.json").write_text('{"model": {}, "settings": {"seed": 99}}')
    out.write_text("")
    run_main(args(ckpt, tmp_path / "p.jsonl", out, max_gen_len=2))
    assert len(load(out)) == 5 and meta(out)["settings"]["seed"] == 1


def test_a_failed_record_fails_alone_and_a_rerun_retries_it(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    _, ckpt = tiny_checkpoints["gqa"]
    records = write_prompts(tmp_path / "p.jsonl", 9)
    out = tmp_path / "o.jsonl"
    real = batch.submit_record

    def submit(engine, r, *rest):
        if r.id == "p4":
            raise RuntimeError("simulated")
        return real(engine, r, *rest)

    with monkeypatch.context() as m:
        m.setattr(batch, "submit_record", submit)
        with pytest.raises(SystemExit) as e:
            run_main(args(ckpt, tmp_path / "p.jsonl", out))
    err = capsys.readouterr().err
    assert e.value.code == 1 and 'id "p4" failed: RuntimeError: simulated' in err and "8 done" in err
    run_main(args(ckpt, tmp_path / "p.jsonl", out))
    assert "1 done, 8 already done" in capsys.readouterr().err
    assert [r["id"] for r in load(out)] == [r["id"] for r in records]


def test_a_prompt_longer_than_the_window_is_reported_as_too_long(tiny_checkpoints, tmp_path, capsys):
    _, ckpt = tiny_checkpoints["gqa"]
    p = tmp_path / "p.jsonl"
    long_text = " ".join(WORDS * 6)
    p.write_text(
        json.dumps({"id": "short", "prompt": "hello"})
        + "\n"
        + json.dumps({"id": "long", "prompt": long_text})
        + "\n{broken\n"
    )
    run_main(args(ckpt, p, tmp_path / "o.jsonl"))
    err = capsys.readouterr().err
    assert "p.jsonl:2: skipped: prompt has " in err and "tokens but max_seq_len is 64" in err
    assert "1 done, 0 already done, 1 skipped (malformed), 0 failed, 1 too long" in err
    assert [r["id"] for r in load(tmp_path / "o.jsonl")] == ["short"]
    with pytest.raises(SystemExit) as e:
        run_main(args(ckpt, p, tmp_path / "strict.jsonl", "--strict"))
    assert e.value.code == 2 and "malformed" in capsys.readouterr().err
    p.write_text(json.dumps({"id": "long", "prompt": long_text}) + "\n")
    with pytest.raises(SystemExit) as e:
        run_main(args(ckpt, p, tmp_path / "strict.jsonl", "--strict"))
    assert e.value.code == 2 and "1 too long" in capsys.readouterr().err
    assert not list(tmp_path.glob("strict.jsonl*"))


@pytest.mark.multiprocess
def test_model_parallel_engine_gives_the_one_process_outputs(tiny_checkpoints, tmp_path):
    _, ckpt = tiny_checkpoints["gqa"]
    write_mixed(tmp_path / "p.jsonl", 12, seed=6)
    run_main(args(ckpt, tmp_path / "p.jsonl", tmp_path / "engine.jsonl", max_seq_len=96))
    mp = torchrun(2, "scripts/complete.py", *args(ckpt, tmp_path / "p.jsonl", tmp_path / "mp.jsonl", max_seq_len=96))
    assert mp.returncode == 0, mp.stderr
    assert "mp=2" in mp.stderr and "12 done, 0 already done" in mp.stderr
    assert load(tmp_path / "mp.jsonl") == load(tmp_path / "engine.jsonl")  # sampled records too: their own seeds
