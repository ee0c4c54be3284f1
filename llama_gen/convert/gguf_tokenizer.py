"""A GGUF's byte-level BPE vocabulary -> a Hugging Face ``tokenizers`` tokenizer (tokenizer.json) and the
tokenizer_config.json that goes with it, tokenizing as llama.cpp does with the same file."""

from pathlib import Path
from typing import Any

# GGUF `tokenizer.ggml.pre` values whose pre-tokenization we reproduce, as llama.cpp's llama-vocab.cpp defines them.
DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
GPT2_REGEX = {None, "default", "gpt2", "mpt", "olmo", "jais"}
LLAMA3_REGEX = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "dbrx", "pixtral"}
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = {"qwen2", "deepseek-r1-qwen"}  # llama.cpp's LLAMA3 split with single digits
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types: matched whole, never split by the pre-tokenizer
NAMED_TOKENS = {"bos_token": "bos", "eos_token": "eos", "pad_token": "padding", "unk_token": "unknown"}


def bytes_to_unicode() -> dict[int, str]:
    """Returns GPT-2's byte -> printable character table used to spell byte-level BPE tokens."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def gguf_tokenizer(meta: dict[str, Any], src: Path) -> tuple[Any, dict[str, Any]]:
    """Returns (tokenizers.Tokenizer, tokenizer_config dict) rebuilt from a GGUF's byte-level BPE vocabulary.

    Mirrors what llama.cpp does with the file: control tokens (type 3) and user-defined ones (type 4) match
    whole, and text is split with the pre-tokenizer `tokenizer.ggml.pre` names.
    """
    from tokenizers import decoders

    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise NotImplementedError(
            f"{src}: tokenizer.ggml.model {model!r} is not supported (only 'gpt2' byte-level BPE); "
            "convert the original Hugging Face checkpoint instead"
        )
    pre_tokenizer = byte_level_pre_tokenizer(
        meta.get("tokenizer.ggml.pre"), bool(meta.get("tokenizer.ggml.add_space_prefix", False)), src
    )
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    tokenizer, vocab = bpe_tokenizer(tokens, meta.get("tokenizer.ggml.merges") or ())
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    named = named_tokens(meta, tokens)
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    add_special_tokens(tokenizer, vocab, tokens, types, named)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and named["bos_token"] is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and named["eos_token"] is not None
    tokenizer.post_processor = post_processor(named, vocab, add_bos, add_eos)
    return tokenizer, tokenizer_config(meta, named, add_bos, add_eos)


def byte_level_pre_tokenizer(pre: str | None, add_prefix_space: bool, src: Path) -> Any:
    """Returns the tokenizers pre-tokenizer that splits text as llama.cpp's pre-tokenizer ``pre`` does."""
    from tokenizers import Regex, pre_tokenizers

    if pre in DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True),
            ]
        )
    if pre in GPT2_REGEX:
        return pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
    if pre in LLAMA3_REGEX or pre in QWEN2_REGEX:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT if pre in LLAMA3_REGEX else QWEN2_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
            ]
        )
    raise NotImplementedError(f"{src}: pre-tokenizer tokenizer.ggml.pre = {pre!r} is not supported")


def bpe_tokenizer(tokens: list[str], merges: Any) -> tuple[Any, dict[str, int]]:
    """Returns (tokenizers.Tokenizer with a byte-level BPE model, its vocabulary) for a GGUF token list and merges."""
    from tokenizers import Tokenizer, models

    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # A few GGUFs store tokens as raw text rather than in the byte alphabet; respell those.
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i for i, t in enumerate(tokens)}
    bpe = models.BPE(
        vocab=vocab,
        merges=[tuple(m.split(" ", 1)) for m in merges],
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
    )
    return Tokenizer(bpe), vocab


def named_tokens(meta: dict[str, Any], tokens: list[str]) -> dict[str, str | None]:
    """Returns {"bos_token": text or None, ...} for the bos, eos, padding and unknown token ids a GGUF names."""

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if i is None or not 0 <= i < len(tokens) else tokens[i]

    return {name: token(key) for name, key in NAMED_TOKENS.items()}


def add_special_tokens(
    tokenizer: Any, vocab: dict[str, int], tokens: list[str], types: list[int], named: dict[str, str | None]
) -> None:
    """Adds the control and named tokens as special tokens and the user-defined ones as added tokens."""
    from tokenizers import AddedToken

    alphabet = set(bytes_to_unicode().values())
    # Tokens typed CONTROL that use characters outside the byte alphabet are llama.cpp mislabels; skip them.
    special = [t for t, ty in zip(tokens, types) if ty == CONTROL and set(t) <= alphabet]
    special += [t for t in named.values() if t is not None and t not in special]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    user_defined = [t for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab]
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user_defined])


def post_processor(named: dict[str, str | None], vocab: dict[str, int], add_bos: bool, add_eos: bool) -> Any:
    """Returns the post-processor that adds the bos/eos tokens the GGUF asks for (or only fixes byte offsets)."""
    from tokenizers import processors

    if not (add_bos or add_eos):
        return processors.ByteLevel(trim_offsets=False)

    def template(seq: str, type_id: int) -> str:
        parts = [named["bos_token"]] * add_bos + [f"${seq}"] + [named["eos_token"]] * add_eos
        return " ".join(f"{part}:{type_id}" for part in parts)

    ids = [(named[k], vocab[named[k]]) for k, on in (("bos_token", add_bos), ("eos_token", add_eos)) if on]
    return processors.TemplateProcessing(
        single=template("A", 0), pair=f"{template('A', 0)} {template('B', 1)}", special_tokens=ids
    )


def tokenizer_config(meta: dict[str, Any], named: dict[str, str | None], add_bos: bool, add_eos: bool) -> dict:
    """Returns the tokenizer_config.json written next to tokenizer.json: special tokens, chat template, context."""
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{k: v for k, v in named.items() if v is not None},
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
    }
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    if meta.get("llama.context_length"):
        config["model_max_length"] = int(meta["llama.context_length"])
    return config
