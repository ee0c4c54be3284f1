"""Chat templates (llama_gen.convert.chat_template): the chat format and default system prompt they imply."""

from tiny_sources import CHATML

from llama_gen.convert.chat_template import chat_format, chat_settings, default_system_prompt


def test_chat_format_detection() -> None:
    assert chat_format(CHATML) == "chatml"
    assert chat_format("{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>' }}") == "llama3"
    assert chat_format("{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}") == "llama2"
    assert chat_format([{"name": "default", "template": CHATML}]) == "chatml"
    assert chat_format(None) is None and chat_format("{{ messages }}") is None


def test_default_system_prompt_is_read_from_the_chat_template() -> None:
    qwen = (
        "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are Qwen.<|im_end|>\n' }}{% endif %}"
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    )
    assert default_system_prompt(qwen) == "You are Qwen."
    plain = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    assert default_system_prompt(plain) is None
    assert chat_settings("<|start_header_id|>") == {"chat_format": "llama3"}
