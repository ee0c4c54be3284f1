"""Meta's example scripts (meta-llama/llama and meta-llama/llama3: example_chat_completion.py and
example_text_completion.py) run on llama_gen with only their import line changed, on random-weight Llama 2 / Llama 3
checkpoints in Meta's own layout, under torchrun as Meta's README runs them.

Meta's scripts are not in this repository (their license keeps them out of our commits) and no package on the registry
ships them (llama-models ships different scripts, written for its own API), so they are read from a local clone:

    python tests/meta_examples.py --llama ~/src/llama --llama3 ~/src/llama3

tests/test_meta_examples.py runs everything but Meta's files in CI, with a stand-in script of the same shape.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TOKENIZERS = {"llama2": SHARED_DATA / "llama2_tokenizer.model", "llama3": SHARED_DATA / "llama3_tokenizer.model"}
# Meta's params.json for each generation, shrunk: Llama 2's says vocab_size -1 (the tokenizer's), Llama 3's
# names its 128256 tokens, grouped-query attention and rope theta 500000.
PARAMS = {
    "llama2": {"dim": 64, "multiple_of": 32, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-05, "vocab_size": -1},
    "llama3": {
        "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128256, "multiple_of": 32,
        "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0,
    },
}  # fmt: skip
VOCAB = {"llama2": 32000, "llama3": 128256}
IMPORT_LINE = re.compile(r"^from llama import (.+)$", flags=re.M)
SPECIAL_TAGS_REPLY = "Error: special tags are not allowed as part of the prompt."


def random_checkpoint(kind: str, out: Path, seed: int = 0) -> Path:
    """Writes a random-weight checkpoint exactly as Meta lays one out (params.json, consolidated.00.pth with Meta's
    tensor names, Llama 2's rope.freqs included, tokenizer.model beside it); returns out."""
    from llama_gen.model import ModelArgs

    params = PARAMS[kind]
    args = ModelArgs.from_params({**params, "vocab_size": VOCAB[kind]})
    generator = torch.Generator().manual_seed(seed)
    hd, kv, hidden = args.head_dim, args.kv_heads, args.ffn_hidden_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, args.dim), "norm.weight": (args.dim,)}
    shapes["output.weight"] = (args.vocab_size, args.dim)
    for i in range(args.n_layers):
        layer = {
            "attention.wq.weight": (args.n_heads * hd, args.dim), "attention.wk.weight": (kv * hd, args.dim),
            "attention.wv.weight": (kv * hd, args.dim), "attention.wo.weight": (args.dim, args.n_heads * hd),
            "feed_forward.w1.weight": (hidden, args.dim), "feed_forward.w2.weight": (args.dim, hidden),
            "feed_forward.w3.weight": (hidden, args.dim), "attention_norm.weight": (args.dim,),
            "ffn_norm.weight": (args.dim,),
        }  # fmt: skip
        shapes.update({f"layers.{i}.{name}": shape for name, shape in layer.items()})
    state = {
        name: torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * shape[1] ** -0.5
        for name, shape in shapes.items()
    }
    if kind == "llama2":
        state["rope.freqs"] = torch.rand(hd // 2, generator=generator)  # Meta's Llama 2 shards carry one
    out.mkdir(parents=True, exist_ok=True)
    torch.save(state, out / "consolidated.00.pth")
    (out / "params.json").write_text(json.dumps(params))
    (out / "tokenizer.model").write_bytes(TOKENIZERS[kind].read_bytes())
    return out


def with_our_import(script: Path, out_dir: Path) -> Path:
    """Returns a copy of script in out_dir whose one ``from llama import ...`` line imports from llama_gen instead."""
    text = script.read_text()
    changed, count = IMPORT_LINE.subn(r"from llama_gen import \1", text)
    if count != 1:
        raise ValueError(f"{script}: expected one `from llama import ...` line, found {count}")
    copy = out_dir / script.name
    copy.write_text(changed)
    return copy


def torchrun(script: Path, ckpt: Path, *flags: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs script as Meta's README does (torchrun --nproc_per_node 1 ... --ckpt_dir --tokenizer_path), on CPU."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    env.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU, float32: what every machine here has
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(free_port()), str(script), "--ckpt_dir", str(ckpt)]
    command += ["--tokenizer_path", str(ckpt / "tokenizer.model"), *flags]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=script.parent)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_examples(repo: Path, kind: str, work: Path) -> None:
    """Runs both example scripts of one Meta repository clone on a random-weight checkpoint; raises on failure."""
    ckpt = random_checkpoint(kind, work / f"{kind}-ckpt")
    for name in ("example_text_completion.py", "example_chat_completion.py"):
        done = torchrun(with_our_import(repo / name, work), ckpt)
        if done.returncode != 0:
            raise RuntimeError(f"{kind} {name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        if kind == "llama2" and name == "example_chat_completion.py" and SPECIAL_TAGS_REPLY not in done.stdout:
            raise RuntimeError(f"{name}: the dialog with special tags did not get the reference's reply")
        print(f"{kind} {name}: ok ({len(done.stdout.splitlines())} lines of output)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama", type=Path, help="a clone of meta-llama/llama (Llama 2)")
    parser.add_argument("--llama3", type=Path, help="a clone of meta-llama/llama3")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        for kind, repo in (("llama2", args.llama), ("llama3", args.llama3)):
            if repo is not None:
                run_examples(repo, kind, Path(work))


if __name__ == "__main__":
    main()
