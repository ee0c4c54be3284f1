"""Reads a source model's Jinja chat template for what generation_config.json records: the chat format and any
default system prompt."""

import re
from typing import Any


def template_text(template: Any) -> str | None:
    """Returns a chat template as one string (Hugging Face's list form joined), or None if it is not one."""
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        template = " ".join(t.get("template", "") for t in template if isinstance(t, dict))
    return template if isinstance(template, str) else None


def chat_format(template: Any) -> str | None:
    """Returns "chatml", "llama3", "llama2" or None, recognised from a Jinja chat template (str or HF list form)."""
    text = template_text(template)
    if text is None:
        return None
    if "<|im_start|>" in text:
        return "chatml"
    if "<|start_header_id|>" in text:
        return "llama3"
    if "[INST]" in text:
        return "llama2"
    return None


def default_system_prompt(template: Any) -> str | None:
    """Returns the system prompt a ChatML chat template inserts when a dialog has none (e.g. SmolLM2's, Qwen2's), or
    None: the first system turn written as plain text (Qwen2.5's comes after a tools branch and the dialog's own)."""
    text = template_text(template)
    if text is None:
        return None
    for match in re.finditer(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, flags=re.S):
        if not re.search(r"[{}'\"+]", match.group(1)):  # no Jinja expression or string concatenation: a fixed default
            return match.group(1)
    return None


def chat_settings(template: Any) -> dict[str, Any]:
    """Returns the chat format (and any default system prompt) recorded in generation_config.json."""
    out: dict[str, Any] = {"chat_format": chat_format(template)}
    system = default_system_prompt(template)
    if system is not None:
        out["default_system_prompt"] = system
    return out
