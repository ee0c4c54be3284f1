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


def test_default_system_prompt_after_a_tools_branch_and_the_dialogs_own() -> None:
    """Qwen2.5's layout: a tools branch and the dialog's own system turn come first, the fixed default last; the
    default is what transformers' apply_chat_template renders for a dialog without a system message."""
    template = (
        "{%- if tools %}{{- '<|im_start|>system\n' }}{{- messages[0]['content'] }}{{- '\n# Tools<|im_end|>\n' }}"
        "{%- elif messages[0]['role'] == 'system' %}"
        "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
        "{%- else %}{{- '<|im_start|>system\nYou are Qwen, a helpful assistant.<|im_end|>\n' }}{%- endif %}"
        "{%- for m in messages %}{%- if m['role'] != 'system' %}"
        "{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    )
    assert default_system_prompt(template) == "You are Qwen, a helpful assistant."
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered = render_jinja_template([[{"role": "user", "content": "Hi"}]], chat_template=template)[0][0]
    assert rendered.startswith("<|im_start|>system\nYou are Qwen, a helpful assistant.<|im_end|>\n")
