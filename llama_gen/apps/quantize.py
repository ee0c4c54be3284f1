"""``llama-gen quantize``: a float checkpoint directory into a quantized one (group-wise int8 or int4).

    llama-gen quantize CKPT_DIR OUT_DIR [--scheme int8-g32] [--tokenizer_path PATH]

Schemes (llama_gen.fast.quantize): int8-g32/64/128 (every linear layer, the output layer and the embedding in int8
with one scale per group), int4-g32/64/128 (linear layers in int4 with a scale and a minimum per group; output layer
and embedding in int8), suffix -out4 (those in int4 too) or -outf (those kept in float). The checkpoint records its
scheme in params.json and ``Llama.build`` (every program's --ckpt_dir) loads it as it is, without --quantize.
"""

from llama_gen.apps.errors import friendly_errors


@friendly_errors
def main(
    ckpt_dir: str | None = None, out_dir: str | None = None, scheme: str = "int8-g32", tokenizer_path: str | None = None
) -> None:
    """Writes CKPT_DIR quantized with --scheme into OUT_DIR (a new directory); prints OUT_DIR and returns None.
    --tokenizer_path: the tokenizer, if CKPT_DIR has none (it is read for the vocabulary size only)."""
    if ckpt_dir is None or out_dir is None:
        raise ValueError("usage: llama-gen quantize CKPT_DIR OUT_DIR [--scheme int8-g32|int4-g32|...]")
    from llama_gen.fast import check_quantization
    from llama_gen.fast.qcheckpoint import quantize_checkpoint

    check_quantization(str(scheme))
    print(quantize_checkpoint(str(ckpt_dir), str(out_dir), str(scheme), tokenizer_path))
