import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFBackend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from llama_gen.tokenizer import (
    LLAMA3_SPECIAL_TOKENS,
    MAX_NO_WHITESPACES_CHARS,
    HFTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    _split_whitespaces_or_nonwhitespaces,
    load_tokenizer,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LLAMA2 = DATA / "llama2_tokenizer.model"
LLAMA3 = DATA / "llama3_tokenizer.model"
MIXED = "Héllo wörld! 你好，世界 🦙🚀 naïve café 👩‍👩‍👧 ok"
HF_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_hf_tokenizer(directory: Path, config: dict | None = None) -> Path:
    """Returns the path of a small GPT-2-style byte-level BPE tokenizer.json written into directory.

    Trained on a corpus that does not contain MIXED verbatim, so multi-byte characters split over tokens.
    Its post-processor appends <|endoftext|>, which HFTokenizer.encode must not do.
    """
    tok = HFBackend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=HF_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["Hello there, how are you? I am fine.", "user assistant system", "café naïve 你 好 世", "llama"]
    tok.train_from_iterator(corpus * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", 0)])
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.json"
    tok.save(str(path))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_sentencepiece_llama2():
    tok = load_tokenizer(LLAMA2)
    assert isinstance(tok, SentencePieceTokenizer) and tok.kind == "sentencepiece"
    assert (tok.n_words, tok.bos_id, tok.eos_ids, tok.eos_id, tok.pad_id) == (32000, 1, [2], 2, -1)
    assert tok.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]
    assert tok.encode("Hello world", bos=False, eos=False) == [15043, 3186]
    ids = tok.encode(MIXED, bos=True, eos=True)
    assert tok.decode(ids) == MIXED
    assert tok.decode(ids + [-1, -1]) == MIXED  # pad -1 is dropped
    with pytest.raises(ValueError, match="id 32000 is outside the 32000-token vocabulary"):
        tok.decode([5, 32000])
    assert tok.special_id("<s>") == 1 and tok.special_id("</s>") == 2 and tok.special_id("<unk>") == 0
    for missing in ["<|eot_id|>", "▁the"]:
        with pytest.raises(ValueError, match="is not in this sentencepiece"):
            tok.special_id(missing)


def test_tiktoken_llama3():
    tok = load_tokenizer(LLAMA3)
    assert isinstance(tok, TiktokenTokenizer) and tok.kind == "tiktoken"
    assert len(LLAMA3_SPECIAL_TOKENS) == len(set(LLAMA3_SPECIAL_TOKENS)) == 256
    assert (tok.n_words, tok.bos_id, tok.eos_ids, tok.eos_id, tok.pad_id) == (
        128256,
        128000,
        [128001, 128009],
        128001,
        -1,
    )
    expected = {
        "<|begin_of_text|>": 128000,
        "<|end_of_text|>": 128001,
        "<|reserved_special_token_0|>": 128002,
        "<|reserved_special_token_3|>": 128005,
        "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007,
        "<|reserved_special_token_4|>": 128008,
        "<|eot_id|>": 128009,
        "<|reserved_special_token_5|>": 128010,
        "<|reserved_special_token_250|>": 128255,
    }
    assert {t: tok.special_id(t) for t in expected} == expected
    with pytest.raises(ValueError, match="<\\|im_start\\|>"):
        tok.special_id("<|im_start|>")
    assert tok.encode("Hello world", bos=True, eos=True) == [128000, 9906, 1917, 128001]
    assert tok.encode("hello world", bos=False, eos=False) == [15339, 1917]
    ids = tok.encode(MIXED, bos=False, eos=False)
    assert tok.decode(ids) == MIXED and tok.decode([-1] + ids + [-1]) == MIXED
    with pytest.raises(ValueError, match="id 128256 is outside"):
        tok.decode([128256])
    # Special-token strings in plain text stay text.
    ids = tok.encode("a<|eot_id|>b<|begin_of_text|>", bos=False, eos=False)
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == "a<|eot_id|>b<|begin_of_text|>"
    assert tok.decode([128000, 15339, 128009]) == "<|begin_of_text|>hello<|eot_id|>"


def test_tiktoken_long_inputs():
    tok = load_tokenizer(LLAMA3)
    for s in ["x" * 60_000, "ab " * 150_000, " " * 30_000 + "z" * 30_000]:
        assert tok.decode(tok.encode(s, bos=False, eos=False)) == s
    s = "a" * 7 + " " * 5 + "b" * 3
    pieces = list(_split_whitespaces_or_nonwhitespaces(s, 3))
    assert "".join(pieces) == s and max(map(len, pieces)) <= 6  # no run longer than 3 inside a piece
    assert list(_split_whitespaces_or_nonwhitespaces("", 3)) == [""]
    assert MAX_NO_WHITESPACES_CHARS == 25_000


def test_hf_tokenizer_sidecar(tmp_path):
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>", "special": True},
        "pad_token": "<|endoftext|>",
    }
    path = write_hf_tokenizer(tmp_path, config)
    tok = load_tokenizer(path)
    assert isinstance(tok, HFTokenizer) and tok.kind == "hf"
    assert (tok.bos_id, tok.eos_ids, tok.eos_id, tok.pad_id) == (1, [2], 2, 0)
    assert tok.n_words == len(json.loads(path.read_text())["model"]["vocab"])
    plain = tok.encode("Hello there", bos=False, eos=False)
    assert 0 not in plain  # the post-processor's <|endoftext|> is not added
    assert tok.encode("Hello there", bos=True, eos=True) == [1] + plain + [2]
    assert tok.decode(plain + [-1]) == "Hello there"
    with pytest.raises(ValueError, match=f"id {tok.n_words} is outside"):
        tok.decode([tok.n_words])
    ids = tok.encode(MIXED, bos=False, eos=False)
    assert tok.decode(ids) == MIXED
    # Special-token strings typed in text are not turned into the special ids.
    ids = tok.encode("<|im_start|>user", bos=False, eos=False)
    assert not set(ids) & {0, 1, 2} and tok.decode(ids) == "<|im_start|>user"
    assert [tok.special_id(t) for t in HF_SPECIALS] == [0, 1, 2]
    with pytest.raises(ValueError, match="<\\|eot_id\\|>"):
        tok.special_id("<|eot_id|>")
    assert tok.decode([1, *plain, 2]) == "<|im_start|>Hello there<|im_end|>"


def test_hf_tokenizer_without_sidecar_and_explicit_ids(tmp_path):
    path = write_hf_tokenizer(tmp_path)
    tok = HFTokenizer(path)
    assert (tok.bos_id, tok.eos_ids, tok.pad_id) == (-1, [], -1)
    assert tok.encode("Hello", bos=True, eos=True) == tok.encode("Hello", bos=False, eos=False)
    with pytest.raises(ValueError, match="no eos"):
        _ = tok.eos_id
    tok = HFTokenizer(path, bos_id=0, eos_ids=[2, 0], pad_id=2)
    assert (tok.bos_id, tok.eos_ids, tok.eos_id, tok.pad_id) == (0, [2, 0], 2, 2)
    # Explicit ids win over the sidecar.
    write_hf_tokenizer(tmp_path, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"})
    assert HFTokenizer(path, bos_id=0, eos_ids=1).eos_ids == [1]
    assert HFTokenizer(path, bos_id=0, eos_ids=1).bos_id == 0
    assert HFTokenizer(path).bos_id == 1
    with pytest.raises(ValueError, match="outside the vocabulary"):
        HFTokenizer(path, eos_ids=[10_000])


def test_hf_tokenizer_bad_sidecar_and_file(tmp_path):
    path = write_hf_tokenizer(tmp_path, {"eos_token": "<|nope|>", "bos_token": None})
    with pytest.raises(ValueError, match="<\\|nope\\|>"):
        HFTokenizer(path)
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        HFTokenizer(path)
    bad = tmp_path / "bad" / "tokenizer.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
        load_tokenizer(bad)


def test_load_tokenizer_paths(tmp_path):
    assert isinstance(load_tokenizer(str(LLAMA2)), SentencePieceTokenizer)
    sp_dir = tmp_path / "sp"
    sp_dir.mkdir()
    shutil.copy(LLAMA2, sp_dir / "tokenizer.model")
    assert isinstance(load_tokenizer(sp_dir), SentencePieceTokenizer)
    tt_dir = tmp_path / "tt"
    tt_dir.mkdir()
    shutil.copy(LLAMA3, tt_dir / "tokenizer.model")
    assert isinstance(load_tokenizer(tt_dir), TiktokenTokenizer)
    # tokenizer.json is preferred over tokenizer.model in the same directory.
    write_hf_tokenizer(tt_dir)
    assert isinstance(load_tokenizer(tt_dir), HFTokenizer)

    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path / "sp" / "..")  # tmp_path itself: no tokenizer files
    with pytest.raises(FileNotFoundError, match="missing.model"):
        load_tokenizer(tmp_path / "missing.model")
    for name, content in [("garbage.model", "hello world\n"), ("empty.model", "")]:
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match=name):
            load_tokenizer(tmp_path / name)
