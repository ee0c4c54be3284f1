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
    """Returns the system prompt a ChatML chat template inserts when a dialog has none (e.g. SmolLM2's), or None."""
    text = template_text(template)
    if text is None:
        return None
    match = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, flags=re.S)
    if match is None or "{" in match.group(1):  # a Jinja expression, not a fixed default
        return None
    return match.group(1)


def chat_settings(template: Any) -> dict[str, Any]:
    """Returns the chat format (and any default system prompt) recorded in generation_config.json."""
    out: dict[str, Any] = {"chat_format": chat_format(template)}
    system = default_system_prompt(template)
    if system is not None:
        out["default_system_prompt"] = system
    return out
