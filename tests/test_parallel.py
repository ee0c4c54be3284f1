"""Model parallel (fairscale under torchrun, gloo on CPU), N-shard checkpoints on M ranks, and resharding."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import LLAMA2_TOKENIZER, REPO
from mp_worker import build, run_checks

from llama_gen import Llama, parallel
from llama_gen.checkpoint import find_shards, load_state_dict, read_params, validate_parallel
from llama_gen.convert.reshard import reshard, shard_state, split_dim
from llama_gen.model import ModelArgs

TOLERANCE = 1e-5  # fp32 logits of every layout vs the single-process, single-shard run


def full_state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt / "consolidated.00.pth", map_location="cpu", weights_only=True)


def model_args(ckpt: Path) -> ModelArgs:
    return ModelArgs.from_params(read_params(ckpt))


@pytest.fixture(scope="module")
def layouts(tiny_checkpoints, tmp_path_factory):
    """Returns {name: ckpt_dir}: the mha (4 KV heads) and gqa (2 KV heads) models as 1, 2 and 4 shards,
    plus "mha_vocab": 2 Llama 3 style shards (embedding split along the vocab) carrying Meta's rope.freqs."""
    root = tmp_path_factory.mktemp("layouts")
    out = {}
    for model in ("mha", "gqa"):
        out[f"{model}1"] = tiny_checkpoints[model][1]
        for n in (2, 4):
            out[f"{model}{n}"] = reshard(str(out[f"{model}1"]), str(root / f"{model}{n}"), n)
    src = out["mha1"]
    vocab_dir = root / "mha_vocab"
    shutil.copytree(src, vocab_dir)
    state, args = full_state(src), model_args(src)
    for rank in range(2):
        shard = shard_state([state], args, 2, rank)
        shard["tok_embeddings.weight"] = state["tok_embeddings.weight"].chunk(2, dim=0)[rank].clone()
        shard["rope.freqs"] = torch.rand(args.head_dim // 2)
        torch.save(shard, vocab_dir / f"consolidated.{rank:02d}.pth")
    out["mha_vocab"] = vocab_dir
    out["qwn1"] = tiny_qwen2(root)  # q/k/v biases, shard with their columns (2 KV heads: replicated on 4 ranks)
    for n in (2, 4):
        out[f"qwn{n}"] = reshard(str(out["qwn1"]), str(root / f"qwn{n}"), n)
    return out


def tiny_qwen2(root: Path) -> Path:
    """Returns a tiny random Qwen2 (8 heads, 2 KV heads, q/k/v biases) converted into root/qwn1."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from llama_gen.convert import convert_hf

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=32000, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
        intermediate_size=176, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )  # fmt: skip
    hf = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.3)
            elif p.dim() == 2:
                p.normal_(0, 0.08)
    hf.save_pretrained(root / "hf_qwen2")
    return convert_hf(root / "hf_qwen2", root / "qwn1")


@pytest.fixture(scope="module")
def reference(layouts):
    """Returns {model: run_checks(...)} of the single-shard checkpoint in this process (no torchrun)."""
    models = ("mha", "gqa", "qwn")
    return {model: run_checks(build(str(layouts[f"{model}1"]), str(LLAMA2_TOKENIZER))) for model in models}


def assert_same_results(got: dict, expected: dict, where: str) -> None:
    for key in ("logits", "cached_logits"):
        diff = (got[key] - expected[key]).abs().max().item()
        assert diff <= TOLERANCE, f"{where}: {key} differ by {diff}"
    for key in ("greedy", "seeded", "global_rng"):
        assert got[key] == expected[key], f"{where}: {key} tokens differ"
    assert torch.allclose(
        torch.tensor(got["greedy_logprobs"]), torch.tensor(expected["greedy_logprobs"]), atol=TOLERANCE
    ), where


# ---- single process: no torchrun, no process group ----------------------------------------------------


def test_helpers_without_distributed():
    assert not torch.distributed.is_initialized()
    assert parallel.model_parallel_world_size() == 1 and parallel.model_parallel_rank() == 0
    assert parallel.data_parallel_world_size() == 1 and parallel.data_parallel_rank() == 0
    assert parallel.init_distributed(None, torch.device("cpu")) == 1
    assert not torch.distributed.is_initialized()
    assert parallel.backend_for(torch.device("cpu")) == "gloo"
    assert parallel.backend_for(torch.device("cuda", 0)) == "nccl"
    assert isinstance(parallel.column_linear(8, 16), torch.nn.Linear)


@pytest.mark.parametrize("layout", ["mha2", "mha4", "mha_vocab", "gqa2", "gqa4", "qwn4"])
def test_one_process_any_shard_count(layouts, reference, layout):
    model = layout[:3]
    llama = build(str(layouts[layout]), str(LLAMA2_TOKENIZER))
    assert type(llama.model.output) is torch.nn.Linear
    assert_same_results(run_checks(llama), reference[model], f"{layout} on 1 process")


@pytest.mark.parametrize("layout", ["mha1", "mha2", "mha4", "mha_vocab", "gqa1", "gqa2", "gqa4", "qwn1", "qwn4"])
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_rank_pieces_reassemble_exactly(layouts, layout, ranks):
    """Every rank's weights, concatenated along the split dim, are the original weights (KV heads repeated)."""
    ckpt = layouts[layout]
    args = model_args(ckpt)
    full = full_state(layouts[f"{layout[:3]}1"])
    pieces = [load_state_dict(ckpt, args, ranks, rank) for rank in range(ranks)]
    assert set(pieces[0]) == set(full)  # rope.freqs dropped
    repeats = max(1, ranks // args.kv_heads)
    for name, weight in full.items():
        dim = split_dim(name)
        if dim is None:
            assert all(torch.equal(p[name], weight) for p in pieces), name
            continue
        if repeats > 1 and name.endswith(("wk.weight", "wv.weight", "wk.bias", "wv.bias")):
            heads = weight.view(args.kv_heads, 1, args.head_dim, -1).expand(-1, repeats, -1, -1)
            weight = heads.reshape(-1, *weight.shape[1:])
        assert torch.equal(torch.cat([p[name] for p in pieces], dim=dim), weight), name


def test_model_is_built_without_allocating_weights(layouts):
    from llama_gen.checkpoint import build_model

    model = build_model(model_args(layouts["mha1"]))
    assert all(p.device.type == "meta" for p in model.parameters())
    llama = build(str(layouts["mha1"]), str(LLAMA2_TOKENIZER))
    assert all(p.device.type == "cpu" for p in llama.model.parameters())


def test_bad_parallel_layouts_raise(tiny_checkpoints):
    _, ckpt = tiny_checkpoints["ffn_multiplier"]  # 6 heads, 3 KV heads, dim 96
    args = model_args(ckpt)
    with pytest.raises(ValueError, match="3 KV heads cannot be spread over 2 model-parallel ranks"):
        validate_parallel(args, 2)
    with pytest.raises(ValueError, match="n_heads=6 is not divisible by 4"):
        validate_parallel(args, 4)
    with pytest.raises(ValueError, match="nproc_per_node 2"):  # not under torchrun: one process
        Llama.build(ckpt, tokenizer_path=str(LLAMA2_TOKENIZER), model_parallel_size=2, device="cpu")
    with pytest.raises(ValueError, match="mp_rank=2"):
        load_state_dict(ckpt, args, 2, 2)


# ---- reshard -------------------------------------------------------------------------------------------


def run_reshard(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "reshard.py"), *args], capture_output=True, text=True, timeout=120
    )


def test_reshard_round_trip_is_exact(layouts, tmp_path):
    two = shutil.copytree(layouts["mha2"], tmp_path / "src")
    (two / "tokenizer.model").write_bytes(LLAMA2_TOKENIZER.read_bytes())
    (two / "checklist.chk").write_text("stale md5s\n")
    for src, out, n in ((two, tmp_path / "one", 1), (tmp_path / "one", tmp_path / "two", 2)):
        done = run_reshard("--ckpt_dir", str(src), "--out_dir", str(out), "--shards", str(n))
        assert done.returncode == 0, done.stderr
        assert "resharding" in done.stderr  # the progress bar
        assert len(find_shards(out)) == n
    for rank in range(2):
        original = torch.load(two / f"consolidated.{rank:02d}.pth", weights_only=True)
        again = torch.load(tmp_path / "two" / f"consolidated.{rank:02d}.pth", weights_only=True)
        assert original.keys() == again.keys()
        assert all(torch.equal(original[k], again[k]) for k in original)
    for name in ("params.json", "generation_config.json", "tokenizer.model"):
        assert (tmp_path / "two" / name).read_bytes() == (two / name).read_bytes()
    assert not (tmp_path / "two" / "checklist.chk").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "src", "two"]  # no temporary directory left behind
    assert json.loads((tmp_path / "one" / "params.json").read_text()) == read_params(two)


def test_reshard_bad_input(layouts, tmp_path):
    src = str(layouts["mha1"])
    with pytest.raises(ValueError, match="n_heads=4 is not divisible by 3"):
        reshard(src, str(tmp_path / "three"), 3)
    with pytest.raises(ValueError, match="positive integer"):
        reshard(src, str(tmp_path / "zero"), 0)
    (tmp_path / "exists").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        reshard(src, str(tmp_path / "exists"), 2)
    assert reshard(src, str(tmp_path / "exists"), 2, overwrite=True) == tmp_path / "exists"
    assert len(find_shards(tmp_path / "exists")) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]
    done = run_reshard("--ckpt_dir", src, "--out_dir", src, "--shards", "2")
    assert done.returncode != 0 and "source checkpoint" in done.stderr


# ---- several processes under torchrun ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, ckpts: list[Path], out: Path, model_parallel_size: int | None = None) -> list[dict]:
    """Runs tests/mp_worker.py on nproc processes; returns each rank's saved results."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(REPO / "tests" / "mp_worker.py"),
        "--out",
        str(out),
        "--tokenizer",
        str(LLAMA2_TOKENIZER),
    ]
    if model_parallel_size is not None:
        command += ["--model_parallel_size", str(model_parallel_size)]
    done = subprocess.run(command + [str(c) for c in ckpts], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(nproc)]


def check_ranks(ranks: list[dict], layouts: dict, reference: dict, names: list[str]) -> None:
    """Asserts every rank returns identical logits and tokens, and that they match the single-process run."""
    for name in names:
        ckpt = str(layouts[name])
        first = ranks[0][ckpt]
        for other in ranks[1:]:
            for key in ("logits", "cached_logits"):
                assert torch.equal(other[ckpt][key], first[key]), f"{name}: {key} differ between ranks"
            for key in ("greedy", "greedy_logprobs", "seeded", "global_rng"):
                assert other[ckpt][key] == first[key], f"{name}: {key} differ between ranks"
        assert_same_results(first, reference[name[:3]], f"{name} on {len(ranks)} processes")


@pytest.mark.multiprocess
def test_two_processes_any_shard_count(layouts, reference, tmp_path):
    names = ["mha1", "mha2", "mha4", "mha_vocab", "gqa2", "qwn1", "qwn4"]
    ranks = torchrun(2, [layouts[n] for n in names], tmp_path)
    check_ranks(ranks, layouts, reference, names)
    for rank, result in enumerate(ranks):
        assert result["facts"] == {
            "rank": rank,
            "world_size": 2,
            "backend": "gloo",
            "mp_rank": rank,
            "mp_world_size": 2,
            "dp_rank": 0,
            "dp_world_size": 1,
        }
        mha = result[str(layouts["mha1"])]
        assert mha["output_layer"] == "ColumnParallelLinear"
        assert (mha["local_heads"], mha["local_kv_heads"]) == (2, 2)  # the KV cache holds the local heads only
        assert mha["logits"].shape[-1] == 32000  # gather_output: full-vocab logits on every rank


@pytest.mark.multiprocess
def test_four_processes_replicate_kv_heads(layouts, reference, tmp_path):
    names = ["gqa1", "gqa2", "gqa4", "qwn2"]  # 2 KV heads on 4 ranks: each KV head (and bias) lives on 2 ranks
    ranks = torchrun(4, [layouts[n] for n in names], tmp_path)
    check_ranks(ranks, layouts, reference, names)
    gqa = ranks[3][str(layouts["gqa4"])]
    assert (gqa["local_heads"], gqa["local_kv_heads"]) == (2, 1)


@pytest.mark.multiprocess
def test_data_parallel_groups(layouts, reference, tmp_path):
    """WORLD_SIZE=4 with model_parallel_size=2: two replicas, each split over two ranks."""
    ranks = torchrun(4, [layouts["mha4"]], tmp_path, model_parallel_size=2)
    check_ranks(ranks, layouts, reference, ["mha4"])
    facts = [
        (r["facts"]["mp_rank"], r["facts"]["mp_world_size"], r["facts"]["dp_rank"], r["facts"]["dp_world_size"])
        for r in ranks
    ]
    assert facts == [(0, 2, 0, 2), (1, 2, 0, 2), (0, 2, 1, 2), (1, 2, 1, 2)]


@pytest.mark.multiprocess
def test_model_parallel_one_keeps_plain_layers(layouts, reference, tmp_path):
    """WORLD_SIZE=2 with model_parallel_size=1: plain layers, but the process group and replica ranks exist."""
    ranks = torchrun(2, [layouts["mha2"]], tmp_path, model_parallel_size=1)
    check_ranks(ranks, layouts, reference, ["mha2"])
    assert [r["facts"]["dp_rank"] for r in ranks] == [0, 1]
    assert all(r["facts"]["dp_world_size"] == 2 and r["facts"]["mp_world_size"] == 1 for r in ranks)
    assert ranks[0][str(layouts["mha2"])]["output_layer"] == "Linear"
