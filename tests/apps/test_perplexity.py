"""``llama-gen perplexity``: the sliding-window perplexity against a direct computation with transformers."""

import json
import math

import pytest
import torch
from conftest import LLAMA2_TOKENIZER

from llama_gen.apps import cli
from llama_gen.apps.perplexity import perplexity, windows

TEXT = (
    "Though this be madness, yet there is method in it. The lighthouse keeper kept a careful log of every ship "
    "that passed the point, and the villagers said he never missed a night in forty years."
)


def test_windows_cover_every_token_once():
    for n, window, stride in [(10, 4, 2), (11, 4, 3), (9, 4, 4), (3, 8, 4), (100, 32, 16)]:
        spans = windows(n, window, stride)
        scored = [t for _, end, k in spans for t in range(end - k, end)]
        assert scored == list(range(1, n)) or window == stride  # every token but the first, once, in order
        assert all(end - begin <= window and k <= end - begin - 1 for begin, end, k in spans)
        assert spans[-1][1] == n


def direct_perplexity(hf, tokens: list[int], window: int, stride: int) -> float:
    """Hugging Face's sliding-window recipe: each window's logits, the tokens not scored before."""
    nll, count = 0.0, 0
    for begin, end, n in windows(len(tokens), window, stride):
        ids = torch.tensor([tokens[begin:end]])
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids).logits[0].double(), dim=-1)
        token_logp = logp[:-1].gather(1, ids[0, 1:, None])[:, 0]
        nll -= token_logp[-n:].sum().item()
        count += n
    return math.exp(nll / count)


@pytest.mark.parametrize("window, stride", [(16, 8), (12, 12)])
def test_perplexity_matches_transformers(tiny_llama, window, stride):
    hf, llama = tiny_llama
    tokens = llama.tokenizer.encode(TEXT, bos=True, eos=False)
    assert len(tokens) > 2 * window
    result = perplexity(llama, tokens, window, stride, progress=False)
    expected = direct_perplexity(hf, tokens, window, stride)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert result["scored"] == sum(n for _, _, n in windows(len(tokens), window, stride))


def test_perplexity_command(tiny_llama, tiny_checkpoints, tmp_path, capsys):
    hf, ckpt = tiny_checkpoints["gqa"]
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    args = ["perplexity", str(text), "--ckpt_dir", str(ckpt), "--tokenizer_path", str(LLAMA2_TOKENIZER)]
    cli.main([*args, "--window", "16", "--stride", "8", "--device", "cpu", "--dtype", "float32", "--json_output"])
    out = capsys.readouterr().out
    tokens = tiny_llama[1].tokenizer.encode(TEXT, bos=True, eos=False)
    assert json.loads(out)["perplexity"] == pytest.approx(direct_perplexity(hf, tokens, 16, 8), rel=1e-4)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--stride", "64", "--window", "32"], "--stride 64 is larger than --window 32"),
        (["--window", "1"], "--window must be an integer >= 2"),
        (["--max_tokens", "1"], "--max_tokens must be an integer >= 2"),
    ],
)
def test_bad_settings_fail_before_loading(tmp_path, capsys, flags, message):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    with pytest.raises(SystemExit) as e:
        cli.main(["perplexity", str(text), "--ckpt_dir", str(tmp_path / "nowhere"), *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_unreadable_text_names_the_file(tmp_path, capsys):
    for path, message in [(tmp_path / "missing.txt", "no such text file"), (tmp_path / "empty.txt", "is empty")]:
        if path.name == "empty.txt":
            path.write_text("  \n")
        with pytest.raises(SystemExit):
            cli.main(["perplexity", str(path), "--ckpt_dir", str(tmp_path)])
        err = capsys.readouterr().err
        assert str(path) in err and message in err
