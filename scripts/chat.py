"""Interactive chat with a Llama-style model (streamed replies, multi-turn history, /commands).

python scripts/chat.py [--ckpt_dir DIR] [--temperature 0.6] [--system "Be brief."] [--max_seq_len 2048]
torchrun --nproc_per_node 2 scripts/chat.py --ckpt_dir DIR      # model parallel over 2 processes
"""

import sys
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_gen.apps.chat import main  # noqa: E402

if __name__ == "__main__":
    fire.Fire(main)
