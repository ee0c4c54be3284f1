"""The setup that runs Meta's example scripts (tests/meta_examples.py), checked with a stand-in script of the same
shape: random-weight checkpoints in Meta's layout, the import line changed, torchrun as Meta's README runs it.

Meta's own scripts cannot run here: their license keeps them out of this repository and no package on the registry
ships them (see tests/meta_examples.py to run them from a local clone).
"""

from pathlib import Path

import pytest
from meta_examples import SPECIAL_TAGS_REPLY, random_checkpoint, torchrun, with_our_import

from llama_gen import Llama

# Our own script in the shape of Meta's example_chat_completion.py: `from llama import ...`, Llama.build with the
# reference's arguments, one chat_completion call with a dialog that contains special tags.
STAND_IN = """
import fire

from llama import Dialog, Llama


def main(ckpt_dir: str, tokenizer_path: str, max_seq_len: int = 96, max_batch_size: int = 2, max_gen_len=None):
    generator = Llama.build(
        ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path, max_seq_len=max_seq_len, max_batch_size=max_batch_size
    )
    dialogs: list[Dialog] = [
        [{"role": "system", "content": "Reply in one word."}, {"role": "user", "content": "Name a colour."}],
        [{"role": "user", "content": "Tags [INST] inside <<SYS>> a message"}],
        [{"role": "user", "content": "And a number?"}],
    ]
    results = generator.chat_completion(dialogs, max_gen_len=max_gen_len, temperature=0.6, top_p=0.9)
    for dialog, result in zip(dialogs, results):
        print(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']!r}")


if __name__ == "__main__":
    fire.Fire(main)
"""


@pytest.mark.multiprocess
def test_llama2_example_shape_under_torchrun(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "example_chat_completion.py").write_text(STAND_IN)
    script = with_our_import(tmp_path / "src" / "example_chat_completion.py", tmp_path)
    assert "from llama_gen import Dialog, Llama" in script.read_text()
    done = torchrun(script, random_checkpoint("llama2", tmp_path / "llama2"), timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    replies = [line for line in done.stdout.splitlines() if line.startswith("> Assistant: ")]
    assert len(replies) == 3 and replies[1] == f"> Assistant: {SPECIAL_TAGS_REPLY!r}"
    assert SPECIAL_TAGS_REPLY not in replies[0] + replies[2]  # only that dialog gets the error reply


def test_random_llama3_checkpoint_in_meta_layout(tmp_path: Path) -> None:
    ckpt = random_checkpoint("llama3", tmp_path / "llama3")
    llama = Llama.build(str(ckpt), tokenizer_path=str(ckpt / "tokenizer.model"), max_seq_len=64, device="cpu")
    assert llama.tokenizer.kind == "tiktoken" and llama.chat_format == "llama3" and llama.model.args.kv_heads == 2
    out = llama.chat_completion([[{"role": "user", "content": "Hi"}]], max_gen_len=4, temperature=0.6, top_p=0.9)
    assert out[0]["generation"]["role"] == "assistant" and out[0]["completion_tokens"] > 0
    with pytest.raises(ValueError, match="one `from llama import ...` line, found 0"):
        with_our_import(ckpt / "params.json", tmp_path)
