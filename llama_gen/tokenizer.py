"""Tokenizers behind one small interface: sentencepiece (Llama 1/2), tiktoken (Llama 3), Hugging Face tokenizer.json."""

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path

import sentencepiece
import tiktoken
import tokenizers
from tiktoken.load import load_tiktoken_bpe

from llama_gen.files import damaged, read_json


class Tokenizer(ABC):
    """What generation code needs from a tokenizer, whichever library implements it."""

    kind: str  # "sentencepiece" | "tiktoken" | "hf": picks the default chat format
    n_words: int  # vocabulary size including special tokens
    bos_id: int  # -1 when the tokenizer has no bos token
    eos_ids: list[int]  # every id that ends generation
    pad_id: int  # id used to pad the token matrix; -1 (as in Meta's reference) means "not a real token"

    @property
    def eos_id(self) -> int:
        """Returns the primary end-of-sequence id (eos_ids[0]), as Meta's Llama reference exposes it."""
        if not self.eos_ids:
            raise ValueError(f"this {self.kind} tokenizer defines no eos token; pass eos ids explicitly")
        return self.eos_ids[0]

    @abstractmethod
    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        """Returns the ids of plain text s (special-token strings in s are encoded as ordinary text)."""

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Returns the text of ids (specials left out if skip_special_tokens); drops ids < 0, ids >= n_words raise."""

    @abstractmethod
    def special_id(self, token: str) -> int:
        """Returns the id of a special token such as "<|eot_id|>"; ValueError if the vocabulary lacks it."""

    def _missing_special(self, token: str) -> ValueError:
        return ValueError(f"special token {token!r} is not in this {self.kind} tokenizer's vocabulary")

    def _decodable(self, ids: Sequence[int]) -> list[int]:
        # Padded token matrices use pad_id=-1, which no library can decode; ids past the vocabulary (a
        # model whose embedding is larger than its tokenizer) would crash or vanish depending on the library.
        out = [int(i) for i in ids if i >= 0]
        if out and max(out) >= self.n_words:
            raise ValueError(
                f"id {max(out)} is outside the {self.n_words}-token vocabulary of this {self.kind} tokenizer"
            )
        return out


class SentencePieceTokenizer(Tokenizer):
    """Llama 1/2 tokenizer.model, exactly as Meta's llama/tokenizer.py uses it."""

    kind = "sentencepiece"

    def __init__(self, model_path: str | Path):
        self.model_path = str(model_path)
        try:
            self.sp_model = sentencepiece.SentencePieceProcessor(model_file=self.model_path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{self.model_path} is not a sentencepiece model: {e}") from e
        self.n_words = self.sp_model.vocab_size()
        self.bos_id = self.sp_model.bos_id()
        self.eos_ids = [self.sp_model.eos_id()]
        self.pad_id = self.sp_model.pad_id()  # -1 for Llama

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        """Returns the ids of s, with bos/eos added as asked."""
        return ([self.bos_id] if bos else []) + self.sp_model.encode(s) + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Returns the text of ids (control tokens always decode to "", a leading space is stripped)."""
        return self.sp_model.decode(self._decodable(ids))

    def special_id(self, token: str) -> int:
        """Returns the id of a control or unknown piece such as "<s>"."""
        i = self.sp_model.piece_to_id(token)
        if self.sp_model.id_to_piece(i) != token or not (self.sp_model.is_control(i) or self.sp_model.is_unknown(i)):
            raise self._missing_special(token)
        return i


# Meta's llama3 tokenizer.py: the special tokens and their order, ids right after the 128000 BPE ranks.
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|> <|end_of_text|> <|reserved_special_token_0|> <|reserved_special_token_1|> "
    "<|reserved_special_token_2|> <|reserved_special_token_3|> <|start_header_id|> <|end_header_id|> "
    "<|reserved_special_token_4|> <|eot_id|>"
).split() + [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)]

LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# tiktoken raises (or takes quadratic time) on very long inputs and very long runs without whitespace.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000


def _split_whitespaces_or_nonwhitespaces(s: str, max_len: int) -> Iterator[str]:
    """Yields consecutive pieces of s so that no run of only-space or only-non-space chars exceeds max_len."""
    run_len = 0
    run_is_space = s[0].isspace() if s else False
    start = 0
    for i, c in enumerate(s):
        is_space = c.isspace()
        if run_is_space ^ is_space:
            run_len, run_is_space = 1, is_space
        else:
            run_len += 1
            if run_len > max_len:
                yield s[start:i]
                start, run_len = i, 1
    yield s[start:]


class TiktokenTokenizer(Tokenizer):
    """Llama 3 tokenizer.model (base64 BPE ranks) plus Meta's 256 special tokens.

    pad_id is -1 as in Meta's reference: callers fill padding with it and never feed it to the model.
    """

    kind = "tiktoken"

    def __init__(self, model_path: str | Path):
        self.model_path = str(model_path)
        mergeable_ranks = load_tiktoken_bpe(self.model_path)
        if not mergeable_ranks:
            raise ValueError(f"{self.model_path} holds no BPE ranks; expected lines of '<base64 token> <rank>'")
        self.n_base = n_base = len(mergeable_ranks)
        self.special_tokens = {token: n_base + i for i, token in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(
            name=Path(self.model_path).name,
            pat_str=LLAMA3_PAT_STR,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        self.n_words = self.model.n_vocab
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_ids = [self.special_tokens["<|end_of_text|>"], self.special_tokens["<|eot_id|>"]]
        self.pad_id = -1

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        """Returns the ids of s, with <|begin_of_text|>/<|end_of_text|> added as asked."""
        t = [self.bos_id] if bos else []
        for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in _split_whitespaces_or_nonwhitespaces(
                s[i : i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS
            ):
                # disallowed_special=() encodes special-token strings as ordinary text instead of raising.
                t.extend(self.model.encode(piece, allowed_special=set(), disallowed_special=()))
        if eos:
            t.append(self.eos_id)
        return t

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Returns the text of ids; special tokens decode to their names (or nothing), broken UTF-8 to U+FFFD."""
        return self.model.decode([i for i in self._decodable(ids) if not skip_special_tokens or i < self.n_base])

    def special_id(self, token: str) -> int:
        """Returns the id of one of the 256 Llama 3 special tokens."""
        if token not in self.special_tokens:
            raise self._missing_special(token)
        return self.special_tokens[token]


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json.

    bos/eos/pad ids come from the arguments when given, else from the tokenizer_config.json next to the
    file (keys bos_token, eos_token, pad_token; no bos when add_bos_token is false), else stay undefined:
    bos_id=-1 (encode(bos=True) adds nothing), eos_ids=[], pad_id=-1. encode never adds the tokenizer.json
    post-processor's own specials.
    """

    kind = "hf"

    def __init__(
        self, path: str | Path, bos_id: int | None = None, eos_ids: Sequence[int] | int | None = None,
        pad_id: int | None = None,
    ):  # fmt: skip
        self.path = str(path)
        try:
            self.model = tokenizers.Tokenizer.from_file(self.path)
        except Exception as e:  # the Rust side raises a bare Exception
            raise damaged(Path(self.path), "is not a Hugging Face tokenizer.json", e) from e
        self.model.encode_special_tokens = True  # else "<|im_start|>" typed in user text becomes the special token
        self.n_words = self.model.get_vocab_size(with_added_tokens=True)
        self._added = {t.content: i for i, t in self.model.get_added_tokens_decoder().items()}

        config_path = Path(self.path).with_name("tokenizer_config.json")
        config = read_json(config_path) if config_path.is_file() else {}

        def from_config(key: str) -> int | None:
            token = config.get(key)  # tokenizer_config.json writes "text" or {"content": "text", ...}
            token = token.get("content") if isinstance(token, dict) else token
            if not isinstance(token, str):
                return None
            i = self.model.token_to_id(token)
            if i is None:
                raise ValueError(f"{config_path}: {key} {token!r} is not in the vocabulary of {self.path}")
            return i

        if bos_id is None and config.get("add_bos_token", True) is not False:
            # add_bos_token=false (e.g. SmolLM2): the model was trained without a leading bos.
            bos_id = from_config("bos_token")
        if eos_ids is None:
            eos = from_config("eos_token")
            eos_ids = [] if eos is None else [eos]
        if pad_id is None:
            pad_id = from_config("pad_token")
        self.bos_id = -1 if bos_id is None else bos_id
        self.eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
        self.pad_id = -1 if pad_id is None else pad_id
        for name, i in [("bos_id", self.bos_id), ("pad_id", self.pad_id)] + [("eos_ids", i) for i in self.eos_ids]:
            if i >= self.n_words:
                raise ValueError(f"{name}={i} is outside the vocabulary of {self.path} ({self.n_words} tokens)")

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        """Returns the ids of s, with bos/eos added as asked and when defined."""
        ids = self.model.encode(s, add_special_tokens=False).ids
        bos_ids = [self.bos_id] if bos and self.bos_id >= 0 else []
        return bos_ids + ids + ([self.eos_id] if eos and self.eos_ids else [])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Returns the text of ids, special tokens included as text unless skip_special_tokens."""
        return self.model.decode(self._decodable(ids), skip_special_tokens=skip_special_tokens)

    def special_id(self, token: str) -> int:
        """Returns the id of a token added to the vocabulary, such as "<|im_start|>"."""
        if token not in self._added:
            raise self._missing_special(token)
        return self._added[token]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Returns the tokenizer stored at path: a directory, a tokenizer.json, or a tokenizer.model (sentencepiece
    or tiktoken)."""
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        raise FileNotFoundError(f"{path} holds neither tokenizer.json nor tokenizer.model")
    if not path.is_file():
        raise FileNotFoundError(
            f"no tokenizer at {path}; expected a tokenizer.json, a tokenizer.model, or a directory with one"
        )
    if path.suffix == ".json":
        return HFTokenizer(path)
    try:
        return SentencePieceTokenizer(path)
    except ValueError:  # not a sentencepiece ModelProto: try the tiktoken ranks format
        pass
    try:
        return TiktokenTokenizer(path)
    except ValueError as e:
        raise damaged(path, "is neither a sentencepiece model nor a tiktoken BPE file", e) from e
