"""Chat prompt formats: Llama 2 [INST], Llama 3 headers, ChatML. Each turns a dialog into prompt ids."""

from abc import ABC, abstractmethod
from typing import Literal, TypedDict

from llama_gen.tokenizer import Tokenizer


class Message(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


Dialog = list[Message]


def _validate_dialog(dialog: Dialog, forbidden: tuple[str, ...]) -> None:
    """Checks the shape every format here needs: [system], user, assistant, user, ..., user."""
    if not isinstance(dialog, list) or not dialog:
        raise ValueError("dialog must be a non-empty list of {'role': ..., 'content': ...} messages")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise ValueError(f"message {i} must be a dict with string 'role' and 'content', got {msg!r}")
        if msg["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"message {i} has role {msg['role']!r}; use 'system', 'user' or 'assistant'")
        for tag in forbidden:
            if tag in msg["content"]:
                raise ValueError(f"message {i} contains the reserved tag {tag!r}; remove it from the content")
    turns = dialog[1:] if dialog[0]["role"] == "system" else dialog
    offset = len(dialog) - len(turns)
    if not turns:
        raise ValueError("dialog has only a system message; add a user message after it")
    for i, msg in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] == "system":
            raise ValueError(f"message {i + offset} has role 'system'; a system message may only come first")
        if msg["role"] != expected:
            raise ValueError(
                f"message {i + offset} has role {msg['role']!r} but {expected!r} was expected; "
                "after an optional system message, roles must alternate user/assistant starting with user"
            )
    if turns[-1]["role"] != "user":
        raise ValueError(
            f"the last message (message {len(dialog) - 1}) must be from the user, got {turns[-1]['role']!r}"
        )


class ChatFormat(ABC):
    """How a dialog becomes the prompt ids after which the model writes the assistant's answer."""

    name: str
    special_tags: tuple[str, ...]  # reserved: a message containing one is refused (or answered with tag_reply)
    tag_reply: str | None = None  # chat_completion's reply to a dialog with special tags, where the reference has one

    @abstractmethod
    def encode_dialog(self, tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
        """Returns the prompt ids for dialog, ending where the assistant's answer starts."""

    @abstractmethod
    def stop_ids(self, tokenizer: Tokenizer) -> list[int]:
        """Returns the ids, beyond the tokenizer's eos_ids, that end the assistant's turn."""

    def validate(self, dialog: Dialog, tags_ok: bool = False) -> None:
        """Returns None if dialog fits this format (special tags only if tags_ok); raises ValueError saying why not."""
        _validate_dialog(dialog, () if tags_ok else self.special_tags)

    def reply(self, dialog: Dialog, text: str) -> str:
        """Returns the reply to dialog, its generated text: or tag_reply for a dialog with special tags, if set."""
        tagged = any(tag in msg["content"] for tag in self.special_tags for msg in dialog)
        return self.tag_reply if tagged and self.tag_reply is not None else text


B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


class Llama2ChatFormat(ChatFormat):
    """Meta's Llama 2 chat_completion template:
    "<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>..."."""

    name = "llama2"
    special_tags = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
    tag_reply = "Error: special tags are not allowed as part of the prompt."  # Meta's UNSAFE_ERROR

    def encode_dialog(self, tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
        """Returns the Llama 2 chat prompt ids, exactly as Meta's Llama.chat_completion builds them (tags included)."""
        self.validate(dialog, tags_ok=True)
        if dialog[0]["role"] == "system":
            first = {"role": dialog[1]["role"], "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}
            dialog = [first] + dialog[2:]
        tokens: list[int] = []
        for prompt, answer in zip(dialog[::2], dialog[1::2]):
            tokens += tokenizer.encode(
                f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ", bos=True, eos=True
            )
        tokens += tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
        return tokens

    def stop_ids(self, tokenizer: Tokenizer) -> list[int]:
        """Returns []: the answer ends with the tokenizer's eos."""
        return []


class Llama3ChatFormat(ChatFormat):
    """Meta's Llama 3 ChatFormat: <|begin_of_text|>, then per message
    <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>."""

    name = "llama3"
    special_tags = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>")

    def _header(self, tokenizer: Tokenizer, role: str) -> list[int]:
        return (
            [tokenizer.special_id("<|start_header_id|>")]
            + tokenizer.encode(role, bos=False, eos=False)
            + [tokenizer.special_id("<|end_header_id|>")]
            + tokenizer.encode("\n\n", bos=False, eos=False)
        )

    def encode_dialog(self, tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
        """Returns the Llama 3 prompt ids, ending with the assistant header."""
        self.validate(dialog)
        tokens = [tokenizer.special_id("<|begin_of_text|>")]
        for msg in dialog:
            tokens += self._header(tokenizer, msg["role"])
            tokens += tokenizer.encode(msg["content"].strip(), bos=False, eos=False)
            tokens.append(tokenizer.special_id("<|eot_id|>"))
        return tokens + self._header(tokenizer, "assistant")

    def stop_ids(self, tokenizer: Tokenizer) -> list[int]:
        """Returns the ids of <|eot_id|> and <|end_of_text|>."""
        return [tokenizer.special_id("<|eot_id|>"), tokenizer.special_id("<|end_of_text|>")]


SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


class ChatMLFormat(ChatFormat):
    """ChatML: <|im_start|>{role}\\n{content}<|im_end|>\\n per message, then <|im_start|>assistant\\n.

    default_system: a system message put first when the dialog has none. Hugging Face chat templates
    often do this (SmolLM2's adds SMOLLM2_DEFAULT_SYSTEM); pass it to get the same ids as
    apply_chat_template. Contents are used as given (not stripped), as those templates do.
    """

    name = "chatml"
    special_tags = ("<|im_start|>", "<|im_end|>")

    def __init__(self, default_system: str | None = None):
        self.default_system = default_system

    def encode_dialog(self, tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
        """Returns the ChatML prompt ids, ending with "<|im_start|>assistant\\n"."""
        self.validate(dialog)
        if self.default_system is not None and dialog[0]["role"] != "system":
            dialog = [{"role": "system", "content": self.default_system}] + dialog
        im_start, im_end = tokenizer.special_id("<|im_start|>"), tokenizer.special_id("<|im_end|>")
        # Encode each whole run of text between two special tokens (e.g. "\n" after <|im_end|>, or
        # "user\nHi"), as HF does when it tokenizes the rendered template: BPE merges may cross "\n".
        tokens = []
        for msg in dialog:
            tokens.append(im_start)
            tokens += tokenizer.encode(f"{msg['role']}\n{msg['content']}", bos=False, eos=False)
            tokens.append(im_end)
            tokens += tokenizer.encode("\n", bos=False, eos=False)
        tokens.append(im_start)
        return tokens + tokenizer.encode("assistant\n", bos=False, eos=False)

    def stop_ids(self, tokenizer: Tokenizer) -> list[int]:
        """Returns the id of <|im_end|>."""
        return [tokenizer.special_id("<|im_end|>")]


CHAT_FORMATS: dict[str, ChatFormat] = {f.name: f for f in (Llama2ChatFormat(), Llama3ChatFormat(), ChatMLFormat())}


def get_chat_format(name: str) -> ChatFormat:
    """Returns the chat format registered under name."""
    if name not in CHAT_FORMATS:
        raise ValueError(f"unknown chat format {name!r}; choose one of {sorted(CHAT_FORMATS)}")
    return CHAT_FORMATS[name]


def _has_special(tokenizer: Tokenizer, token: str) -> bool:
    try:
        tokenizer.special_id(token)
    except ValueError:
        return False
    return True


def default_chat_format(tokenizer: Tokenizer) -> str:
    """Returns the name of the chat format a model with this tokenizer most likely expects."""
    if tokenizer.kind == "tiktoken":
        return "llama3"
    if tokenizer.kind == "hf" and _has_special(tokenizer, "<|im_start|>"):
        return "chatml"
    if tokenizer.kind == "hf" and _has_special(tokenizer, "<|start_header_id|>"):
        return "llama3"  # a Llama 3 checkpoint shipped with a tokenizer.json
    return "llama2"
