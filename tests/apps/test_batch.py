"""Batch completion from prompt files: parsing, batching, exactly-once resumable output, data parallel."""

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
from programs import ENV, run_script, torchrun

from llama_gen.apps import batch
from llama_gen.apps.batch import Record, merge_parts, read_output, read_prompts, record_settings

WORDS = "the quick brown fox jumps over a lazy dog and then runs far away into the night".split()


def write_prompts(path: Path, n: int, seed: int = 0, dialogs: bool = True) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        text = " ".join(rng.choices(WORDS, k=rng.randint(1, 12)))
        rec = {"id": f"p{i}", "prompt": text}
        if dialogs and i % 7 == 3:
            rec = {"id": f"p{i}", "dialog": [{"role": "user", "content": text}]}
        if i % 5 == 4:
            rec["max_gen_len"] = 4  # a second settings group
        records.append(rec)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def args(ckpt, prompts, output, *extra, **flags) -> list[str]:
    flags = {
        "tokenizer_path": LLAMA2_TOKENIZER,
        "max_seq_len": 64,
        "max_batch_size": 4,
        "max_gen_len": 8,
        "temperature": 0,
        **({} if "--compile" in extra else {"compile": False}),  # (no background compile unless asked for)
        **flags,
    }
    return [
        str(prompts),
        "--output",
        str(output),
        "--ckpt_dir",
        str(ckpt),
        *extra,
        *(f"--{k}={v}" for k, v in flags.items()),
    ]


def run_main(argv: list[str]) -> None:
    import fire

    fire.Fire(batch.main, command=argv)


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_read_prompts_txt_and_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n  second with spaces  \nthird\n")
    records, bad, _ = read_prompts(txt)
    assert [(r.id, r.prompt) for r in records] == [(1, "first prompt"), (3, "  second with spaces  "), (4, "third")]
    assert bad == []

    jl = tmp_path / "p.jsonl"
    jl.write_text(
        "\n".join(
            [
                '{"id": "a", "prompt": "hi", "temperature": 0.5, "stop": "x", "note": 1}',
                '{"prompt": "no id"}',
                '{"id": "c", "dialog": [{"role": "user", "content": "yo"}], "seed": 3}',
                "not json",
                '["a list"]',
                '{"id": "d"}',
                '{"id": "e", "prompt": "x", "dialog": []}',
                '{"id": 1.5, "prompt": "x"}',
                '{"id": "f", "prompt": "x", "top_p": 0}',
                '{"id": "g", "prompt": "x", "max_gen_len": -2}',
                '{"id": "h", "prompt": "x", "stop": [""]}',
            ]
        )
        + "\n"
    )
    records, bad, unknown = read_prompts(jl)
    assert [r.id for r in records] == ["a", 2, "c"]
    assert records[0].settings == {"temperature": 0.5, "stop": ["x"]} and records[2].kind == "dialog"
    assert [line for line, _ in bad] == [4, 5, 6, 7, 8, 9, 10, 11]
    assert "invalid JSON" in bad[0][1] and "top_p" in bad[5][1] and "max_gen_len" in bad[6][1]
    assert unknown == {"note"}
    with pytest.raises(ValueError, match=r"\.txt .* or \.jsonl"):
        read_prompts(tmp_path / "p.csv")


def test_duplicate_ids_fail_before_anything_is_loaded(tmp_path, capsys, monkeypatch):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": 1, "prompt": "a"}\n{"id": "1", "prompt": "b"}\n{"id": 1, "prompt": "c"}\n')
    monkeypatch.setattr("llama_gen.generation.Llama.build", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit) as e:
        run_main([str(p)])
    assert e.value.code == 2
    assert "duplicate ids: id 1 on lines 1, 3" in capsys.readouterr().err  # "1" is a different id
    assert not (tmp_path / "p.out.jsonl").exists()


def test_read_output_drops_a_torn_last_line(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"id": "a", "generation": "x"}\n{"id": "b", "generation": "y"}\n{"id": "c", "gene')
    assert list(read_output(out, repair=False)) == ['"a"', '"b"']
    assert out.read_text().endswith('"gene')  # untouched without repair
    read_output(out, repair=True)
    assert out.read_text() == '{"id": "a", "generation": "x"}\n{"id": "b", "generation": "y"}\n'
    out.write_text('{"id": "a"}\ngarbage\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"o\.jsonl:2"):
        read_output(out, repair=True)


def test_merge_parts_keeps_each_id_once(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"id": 1, "g": "a"}\n{"id": 2, "g": "b"}\n')
    (tmp_path / "o.jsonl.part-0").write_text('{"id": 2, "g": "b"}\n{"id": 3, "g": "c"}\n{"id": 4, "g"')
    (tmp_path / "o.jsonl.part-1").write_text('{"id": 5, "g": "e"}\n')
    assert merge_parts(out) == 2
    assert [r["id"] for r in load(out)] == [1, 2, 3, 5]
    assert not list(tmp_path.glob("*.part-*"))
    assert merge_parts(out) == 0


def test_record_settings_seed_only_the_records_that_sample():
    recs = [Record(i, i, prompt="x", settings={"temperature": 0.5} if i % 3 == 0 else {}) for i in range(10)]
    recs.append(Record(99, 99, prompt="x", settings={"temperature": 0.7, "seed": 5}))
    settings = [record_settings(r, {"max_gen_len": 8, "temperature": 0}, run_seed=1, config={}) for r in recs]
    assert all(s["max_gen_len"] == 8 for s in settings)
    seeds = [s["seed"] for s in settings if "seed" in s]
    # A record that samples has its own seed (its own, else derived from the run's seed and its id); greedy: none.
    assert len(seeds) == 5 and len(set(seeds)) == 5 and all(0 <= s < 2**63 for s in seeds) and seeds[-1] == 5
    assert seeds[:4] == [record_settings(r, {}, run_seed=1, config={})["seed"] for r in recs[:10:3]]
    assert seeds[:4] != [record_settings(r, {}, run_seed=2, config={})["seed"] for r in recs[:10:3]]


def test_malformed_lines_are_reported_and_skipped(tiny_checkpoints, tmp_path, capsys):
    _, ckpt = tiny_checkpoints["gqa"]
    good = write_prompts(tmp_path / "good.jsonl", 50)
    lines = [json.dumps(r) for r in good]
    lines.insert(10, "{broken json")
    lines.insert(30, '{"id": "z1", "prompt": 42}')
    lines.insert(45, '{"id": "z2", "prompt": "fine", "temperature": "hot"}')
    p = tmp_path / "mixed.jsonl"
    p.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    run_main(args(ckpt, p, out, "--logprobs"))
    err = capsys.readouterr().err
    for line in (11, 31, 46):
        assert f"mixed.jsonl:{line}: skipped" in err
    assert "50 done, 0 already done, 3 skipped (malformed), 0 failed" in err
    results = load(out)
    assert [r["id"] for r in results] == [r["id"] for r in good]  # input order
    for r in results:
        assert r["finish_reason"] in ("eos", "length", "stop")
        assert len(r["tokens"]) == len(r["logprobs"]) == r["completion_tokens"] <= 8 and r["prompt_tokens"] > 0

    with pytest.raises(SystemExit) as e:  # --strict: nothing runs
        run_main(args(ckpt, p, tmp_path / "strict.jsonl", "--strict"))
    assert e.value.code == 2 and "3 malformed lines" in capsys.readouterr().err
    assert not (tmp_path / "strict.jsonl").exists()


def test_outputs_match_the_api_and_txt_input(tiny_checkpoints, tmp_path, capsys):
    from llama_gen import Llama

    _, ckpt = tiny_checkpoints["gqa"]
    prompts = ["Hello world", "The capital of France is", "a", "one two three four five six seven"]
    p = tmp_path / "p.txt"
    p.write_text("\n".join(prompts) + "\n")
    run_main(args(ckpt, p, tmp_path / "o.jsonl", max_batch_size=3))
    results = load(tmp_path / "o.jsonl")
    llama = Llama.build(ckpt, tokenizer_path=str(LLAMA2_TOKENIZER), max_seq_len=64, max_batch_size=4, device="cpu")
    expected = llama.text_completion(prompts, temperature=0, max_gen_len=8)
    assert [r["id"] for r in results] == [1, 2, 3, 4]
    assert [r["generation"] for r in results] == [e["generation"] for e in expected]
    assert "tokens" not in results[0]
    run_main(args(ckpt, p, tmp_path / "o.jsonl"))  # everything done: nothing to do
    assert "0 done, 4 already done" in capsys.readouterr().err


def test_compile_flag_gives_the_eager_outputs(tiny_checkpoints, tmp_path):
    _, ckpt = tiny_checkpoints["gqa"]
    p = tmp_path / "p.jsonl"
    write_prompts(p, 6, dialogs=False)
    run_main(args(ckpt, p, tmp_path / "eager.jsonl", max_batch_size=3))
    run_main(args(ckpt, p, tmp_path / "fast.jsonl", "--compile", max_batch_size=3))
    assert load(tmp_path / "fast.jsonl") == load(tmp_path / "eager.jsonl")


def test_unknown_quantization_fails_before_anything_is_loaded(tmp_path, monkeypatch, capsys):
    from llama_gen import generation

    monkeypatch.setattr(generation.Llama, "build", lambda *a, **k: pytest.fail("loaded a model"))
    p = tmp_path / "p.txt"
    p.write_text("hello\n")
    with pytest.raises(SystemExit) as exit_info:
        batch.main(str(p), quantize="int4")
    assert exit_info.value.code == 2 and "unknown quantization 'int4': use one of int8" in capsys.readouterr().err
    assert not (tmp_path / "p.out.jsonl").exists()


def test_kill_9_then_rerun_gives_each_id_exactly_once(tiny_checkpoints, tmp_path):
    _, ckpt = tiny_checkpoints["gqa"]
    write_prompts(tmp_path / "p.jsonl", 200, seed=1)
    out = tmp_path / "out.jsonl"
    cmd = [
        sys.executable,
        "scripts/complete.py",
        *args(ckpt, tmp_path / "p.jsonl", out, max_gen_len=24, max_batch_size=2),
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 20:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    first = {r["id"]: r for r in load(out)}
    assert 20 <= len(first) < 200
    with open(out, "a") as f:
        f.write('{"id": "p199", "generation": "torn wri')  # as if killed in the middle of a write

    rerun = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{200 - len(first)} done, {len(first)} already done, 0 skipped" in rerun.stderr
    final = load(out)
    ids = [r["id"] for r in final]
    assert ids == [f"p{i}" for i in range(200)]  # each once, in input order
    for r in final:
        if r["id"] in first:
            assert r == first[r["id"]]  # finished ones untouched


@pytest.mark.multiprocess
def test_torchrun_data_parallel_matches_one_process(tiny_checkpoints, tmp_path):
    _, ckpt = tiny_checkpoints["gqa"]
    write_prompts(tmp_path / "p.jsonl", 40, seed=2)
    single, dp = tmp_path / "single.jsonl", tmp_path / "dp.jsonl"
    one = run_script("scripts/complete.py", *args(ckpt, tmp_path / "p.jsonl", single), timeout=180)
    assert one.returncode == 0, one.stderr
    two = torchrun(2, "scripts/complete.py", *args(ckpt, tmp_path / "p.jsonl", dp, model_parallel_size=1))
    assert two.returncode == 0, two.stderr
    assert "40 done, 0 already done, 0 skipped (malformed), 0 failed" in two.stderr
    assert load(dp) == load(single)  # same records, each id once, same order
    assert not list(tmp_path.glob("dp.jsonl.part-*"))


def test_parts_left_by_a_crashed_data_parallel_run_are_resumed(tiny_checkpoints, tmp_path, capsys):
    _, ckpt = tiny_checkpoints["gqa"]
    records = write_prompts(tmp_path / "p.jsonl", 12, seed=3, dialogs=False)
    out = tmp_path / "o.jsonl"
    leftover = {"p1": "from part 0", "p5": "from part 1", "p7": "from part 1"}
    (tmp_path / "o.jsonl.part-0").write_text(json.dumps({"id": "p1", "generation": leftover["p1"]}) + '\n{"id": ')
    (tmp_path / "o.jsonl.part-1").write_text(
        "".join(json.dumps({"id": k, "generation": v}) + "\n" for k, v in leftover.items() if k != "p1")
    )
    run_main(args(ckpt, tmp_path / "p.jsonl", out))
    assert "9 done, 3 already done" in capsys.readouterr().err
    results = load(out)
    assert [r["id"] for r in results] == [r["id"] for r in records]
    assert {r["id"]: r["generation"] for r in results if r["id"] in leftover} == leftover
    assert not list(tmp_path.glob("o.jsonl.part-*"))
