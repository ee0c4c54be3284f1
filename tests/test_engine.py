"""The core engine against Hugging Face transformers' LlamaForCausalLM as the independent reference."""

import json
import shutil

import pytest
import torch
from conftest import LLAMA2_TOKENIZER, TINY_CONFIGS

from llama_gen import Llama

PROMPTS = [  # token ids of different lengths
    [1, 450, 4996, 17354, 1701, 29916],
    [1, 15043],
    [1, 306, 4658, 278, 6593, 310, 2834, 338, 29871, 29946, 29906, 29889],
    [1, 3439, 17632, 1919],
    [1, 450, 7483, 310, 3444, 338],
]


def build(ckpt, **kwargs) -> Llama:
    kwargs = {"max_seq_len": 128, "max_batch_size": 4, "device": "cpu", "dtype": "float32", **kwargs}
    return Llama.build(ckpt, tokenizer_path=str(LLAMA2_TOKENIZER), **kwargs)


def random_tokens(rows: int, length: int, seed: int = 1) -> torch.Tensor:
    """Returns [rows, length] token ids drawn from the tiny models' 32,000-token vocabulary."""
    return torch.randint(0, 32000, (rows, length), generator=torch.Generator().manual_seed(seed))


def stepwise_logits(forward, tokens: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits of a prefill of prompt_len tokens, then one token at a time."""
    steps = [forward(tokens[:, :prompt_len], 0)]
    steps += [forward(tokens[:, i : i + 1], i) for i in range(prompt_len, tokens.shape[1])]
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_logits_match_transformers(tiny_checkpoints, name):
    hf, ckpt = tiny_checkpoints[name]
    llama, tokens = build(ckpt), random_tokens(3, 90)
    with torch.no_grad():
        expected = hf(tokens).logits
    full = llama.model.forward(tokens, 0)
    assert (full - expected).abs().max().item() <= 1e-4
    # Prefill then one token at a time through the KV cache gives the same logits.
    assert (stepwise_logits(llama.model.forward, tokens, 40) - expected).abs().max().item() <= 1e-4


def test_echo_logprobs_match_transformers_log_softmax(tiny_llama):
    hf, llama = tiny_llama
    prompt = PROMPTS[2]
    tokens, logprobs = llama.generate([prompt], max_gen_len=0, logprobs=True, echo=True)
    assert tokens[0] == prompt
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].double(), dim=-1)
    expected = logp[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert logprobs[0][0] == 0.0  # the first token has no prediction, as in Meta's reference
    assert torch.allclose(torch.tensor(logprobs[0][1:], dtype=torch.float64), expected, atol=1e-4)

    # Echo with generation: prompt logprobs are the same, generated ones match HF on the full sequence.
    tokens, logprobs = llama.generate([prompt], max_gen_len=5, temperature=0, logprobs=True, echo=True)
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([tokens[0]])).logits[0].double(), dim=-1)
    expected = logp[:-1].gather(1, torch.tensor(tokens[0][1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(logprobs[0][1:], dtype=torch.float64), expected, atol=1e-4)


def test_greedy_batch_equals_alone_and_transformers(tiny_llama):
    hf, llama = tiny_llama
    batch, _ = llama.generate(PROMPTS, max_gen_len=12, temperature=0)  # 5 prompts > max_batch_size=4
    for prompt, out in zip(PROMPTS, batch):
        alone, _ = llama.generate([prompt], max_gen_len=12, temperature=0)
        assert out == alone[0]
        hf_out = hf.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=0
        )[0, len(prompt) :].tolist()
        if 2 in hf_out:
            hf_out = hf_out[: hf_out.index(2)]
        assert out == hf_out
        assert len(out) > 0


def test_generate_stops_at_eos_and_truncates(tiny_llama):
    _, llama = tiny_llama
    first, _ = llama.generate([PROMPTS[0]], max_gen_len=12, temperature=0)
    stop_id = first[0][3]
    out, _ = llama.generate([PROMPTS[0]], max_gen_len=12, temperature=0, stop_token_ids=[stop_id])
    assert out[0] == first[0][: first[0].index(stop_id)]


def test_max_gen_len_is_clipped_to_window(tiny_llama):
    _, llama = tiny_llama
    out, _ = llama.generate([PROMPTS[2]], max_gen_len=10_000, temperature=0)
    assert len(PROMPTS[2]) + len(out[0]) == llama.model.args.max_seq_len


def test_text_and_chat_completion_shapes(tiny_llama):
    _, llama = tiny_llama
    preds = llama.text_completion(["Hello", "The capital of France is"], max_gen_len=5, temperature=0, logprobs=True)
    assert len(preds) == 2 and all(isinstance(p["generation"], str) for p in preds)
    assert len(preds[0]["tokens"]) == len(preds[0]["logprobs"]) <= 5
    chats = llama.chat_completion([[{"role": "user", "content": "hi"}]], max_gen_len=4, temperature=0)
    assert chats[0]["generation"]["role"] == "assistant"


class CountingForward:
    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


BAD_CALLS = {
    "prompt too long": (lambda llama: llama.generate([[1] * 200], max_gen_len=4), "200 tokens but max_seq_len is 128"),
    "negative temperature": (lambda llama: llama.text_completion(["hi"], temperature=-0.1), "temperature"),
    "top_p zero": (lambda llama: llama.text_completion(["hi"], top_p=0.0), "top_p"),
    "top_p above one": (lambda llama: llama.text_completion(["hi"], top_p=1.5), "top_p"),
    "single string": (lambda llama: llama.text_completion("hi"), "list"),
    "not alternating": (
        lambda llama: llama.chat_completion([[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]]),
        "alternate",
    ),
    "ends with assistant": (
        lambda llama: llama.chat_completion(
            [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]]
        ),
        "user",
    ),
    # (chat_completion answers such a Llama 2 dialog as the reference does: tests/test_chat_format.py)
    "special tag": (lambda llama: llama.stream_chat_completion([[{"role": "user", "content": "[INST] hi"}]]), "[INST]"),
    "sys tag": (lambda llama: llama.stream_chat_completion([[{"role": "user", "content": "<<SYS>> x"}]]), "<<SYS>>"),
    "empty prompt tokens": (lambda llama: llama.generate([[]], max_gen_len=4), "empty"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_raises_before_compute(tiny_llama, case, monkeypatch):
    _, llama = tiny_llama
    call, message = BAD_CALLS[case]
    counter = CountingForward(llama.forward)  # what the loop runs the model with
    monkeypatch.setattr(llama, "forward", counter)
    with pytest.raises(ValueError) as err:
        call(llama)
    assert message.lower() in str(err.value).lower()
    assert counter.calls == 0


def test_missing_shard_is_named(tiny_checkpoints, tmp_path):
    _, ckpt = tiny_checkpoints["mha"]
    shutil.copytree(ckpt, tmp_path / "ck")
    (tmp_path / "ck" / "consolidated.00.pth").rename(tmp_path / "ck" / "consolidated.01.pth")
    with pytest.raises(FileNotFoundError, match="consolidated.00.pth"):
        build(tmp_path / "ck")


def test_shape_mismatch_names_the_numbers(tiny_checkpoints, tmp_path):
    _, ckpt = tiny_checkpoints["mha"]
    shutil.copytree(ckpt, tmp_path / "ck")
    params = json.loads((tmp_path / "ck" / "params.json").read_text())
    params["n_heads"] = 8
    params["n_kv_heads"] = 8
    params["dim"] = 128
    (tmp_path / "ck" / "params.json").write_text(json.dumps(params))
    with pytest.raises(
        ValueError, match=r"layers\.0\.attention\.wq\.weight has shape \[64, 64\], the model expects \[128, 128\]"
    ):
        build(tmp_path / "ck")


def test_vocab_mismatch_names_file_and_sizes(tiny_checkpoints, tmp_path):
    _, ckpt = tiny_checkpoints["mha"]
    with pytest.raises(ValueError, match=r"128256 tokens.*vocab_size=32000"):
        Llama.build(
            ckpt,
            tokenizer_path=str(LLAMA2_TOKENIZER.parent / "llama3_tokenizer.model"),
            max_seq_len=64,
            max_batch_size=1,
            device="cpu",
        )
