"""The default SmolLM2-135M-Instruct model against Hugging Face transformers loading the same GGUF file."""

import pytest
import torch

from llama_gen import Llama
from llama_gen.convert import default_gguf, ensure_default_model

pytestmark = pytest.mark.real_model

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three primary colors."},
    ],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "Give me a tip for learning Python."},
    ],
    [{"role": "user", "content": "Explain what a neural network is in one paragraph."}],
]


@pytest.fixture(scope="module")
def smollm2():
    return Llama.build(ensure_default_model(), max_seq_len=512, max_batch_size=5, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def hf_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_gguf()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return tokenizer, model


def test_chat_prompt_ids_match_transformers_template(smollm2, hf_smollm2):
    tokenizer, _ = hf_smollm2
    for dialog in CHATS:
        ours = smollm2.get_chat_format().encode_dialog(smollm2.tokenizer, dialog)
        theirs = tokenizer.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
        theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
        assert ours == list(theirs)


def test_greedy_answers_match_transformers(smollm2, hf_smollm2):
    tokenizer, model = hf_smollm2
    ours = smollm2.chat_completion(CHATS, temperature=0, max_gen_len=64)  # one batch of five
    prompts = [smollm2.get_chat_format().encode_dialog(smollm2.tokenizer, d) for d in CHATS]
    for prompt, pred in zip(prompts, ours):
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=64,
                do_sample=False,
                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=2,
            )
        expected = out[0, len(prompt) :].tolist()
        if expected and expected[-1] == 2:
            expected = expected[:-1]
        got = smollm2.generate([prompt], max_gen_len=64, temperature=0)[0][0]
        assert got == expected
        assert pred["generation"]["content"] == smollm2.tokenizer.decode(got)


def test_capital_of_france_mentions_paris(smollm2):
    answer = smollm2.chat_completion([CHATS[0]], temperature=0, max_gen_len=48)[0]
    assert "Paris" in answer["generation"]["content"]
