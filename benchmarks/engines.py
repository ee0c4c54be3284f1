"""The engines the harness compares, behind one small interface.

Every engine decodes greedily, exactly ``new_tokens`` tokens per prompt (EOS ignored), from the same token ids.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
LLAMA2_TOKENIZER = REPO.parent / "shared" / "data" / "llama2_tokenizer.model"
SEVEN_B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000, multiple_of=256)
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModelSpec:
    """Where each engine finds the model. ``kind``: default | tiny | 7b-random."""

    kind: str
    ckpt_dir: str | None = None  # our Meta-style checkpoint
    tokenizer_path: str | None = None
    hf_dir: str | None = None  # Hugging Face directory (holding the GGUF file, or config.json + weights)
    gguf_file: str | None = None  # file name inside hf_dir

    @property
    def gguf_path(self) -> str | None:
        return str(Path(self.hf_dir) / self.gguf_file) if self.gguf_file else None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


class Engine:
    """name, weight bytes, bytes read per decoded token, KV cache bytes, and greedy generation."""

    name = "engine"
    max_batch = 1 << 30
    weights_bytes = 0
    read_bytes_per_token = 0
    kv_bytes = 0
    compile_s: float | None = None

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        raise NotImplementedError

    def warm_up(self, batch_sizes: list[int], max_pos: int) -> None:
        pass


# ---- ours ----------------------------------------------------------------------------------------------


class Ours(Engine):
    def __init__(self, spec: ModelSpec, variant: str, device: str, max_seq_len: int, max_batch: int, compile: bool):
        from llama_gen import Llama
        from llama_gen.fast.packed import PackedLinear

        quantize, dtype = variant_settings(variant)
        self.name = f"ours {variant}" + ("" if compile else " (eager)")
        self.device = device
        self.max_batch = max_batch
        if variant.startswith("q4_1"):  # the default GGUF's own blocks, kept as they are (a quantized checkpoint)
            from llama_gen.convert import ensure_default_model

            spec = ModelSpec(kind=spec.kind, ckpt_dir=str(ensure_default_model(keep_quantized=True)))
        if spec.kind == "7b-random":
            self.llama = random_llama(device, TORCH_DTYPES[dtype], max_seq_len, max_batch, compile, quantize)
        else:
            self.llama = Llama.build(
                spec.ckpt_dir,
                tokenizer_path=spec.tokenizer_path,
                max_seq_len=max_seq_len,
                max_batch_size=max_batch,
                device=device,
                dtype=dtype,
                compile=compile,
                quantize=quantize,
            )
        self.llama.eos_ids = []  # always decode exactly new_tokens, like the other engines
        model = self.llama.model
        self.weights_bytes = tensor_bytes([*model.parameters(), *model.buffers()]) + sum(
            m.nbytes() for m in model.modules() if isinstance(m, PackedLinear)
        )  # packed weights are neither
        table = [*model.tok_embeddings.parameters(), *model.tok_embeddings.buffers()]
        tied = {t.data_ptr() for t in table} & {
            t.data_ptr() for t in [*model.output.parameters(), *model.output.buffers()]
        }
        # decoding reads one embedding row (but all of it where the output layer shares it)
        self.read_bytes_per_token = self.weights_bytes - (0 if tied else tensor_bytes(table))
        self.kv_bytes = tensor_bytes(
            [t for layer in model.layers for t in (layer.attention.cache_k, layer.attention.cache_v)]
        )

    def warm_up(self, batch_sizes: list[int], max_pos: int) -> None:
        fast = self.llama.forward  # a FastForward when built with compile or quantize
        if hasattr(fast, "warm_up"):
            fast.warm_up(tuple(batch_sizes), max_pos)
            self.compile_s = sum(fast.compile_seconds.values())

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        out, _ = self.llama.generate(prompts, max_gen_len=new_tokens, temperature=0)
        sync(self.device)
        return out


def variant_settings(variant: str) -> tuple[str | None, str]:
    """Returns (quantize, dtype) of one of our variants: fp32, bf16, int8 (per channel, fp32 activations), int8-bf16
    (bf16 activations), any group-wise --quantize name (int8-g32, int4-g32, ...: fp32 activations; int8-g32-bf16:
    in a bf16 model), q4_1 (the GGUF's blocks: already quantized; fp32 activations) and q4_1-bf16 (the same blocks
    in a bf16 model)."""
    if variant in TORCH_DTYPES:
        return None, variant
    if variant in ("q4_1", "q4_1-bf16"):
        return None, "bf16" if variant == "q4_1-bf16" else "fp32"
    if variant.startswith("int8-") and variant.split("-")[1] in TORCH_DTYPES:
        return "int8", variant.split("-")[1]
    scheme, _, dtype = variant.rpartition("-")
    if scheme and dtype in TORCH_DTYPES:  # int8-g32-bf16: a group-wise scheme in a bf16 model
        return scheme, dtype
    return variant, "fp32"


def random_llama(
    device: str, dtype: torch.dtype, max_seq_len: int, max_batch: int, compile: bool, quantize: str | None
):
    """Returns a Llama with a 7B-shaped random-weight model (no checkpoint needed) and the Llama 2 tokenizer."""
    from llama_gen import Llama
    from llama_gen.model import ModelArgs, Transformer
    from llama_gen.tokenizer import load_tokenizer

    args = ModelArgs(**SEVEN_B, max_seq_len=max_seq_len, max_batch_size=max_batch)
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device=device).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    return Llama.from_model(model, load_tokenizer(LLAMA2_TOKENIZER), compile=compile, quantize=quantize)


# ---- Hugging Face transformers ----------------------------------------------------------------------


class HF(Engine):
    def __init__(self, spec: ModelSpec, dtype: str, device: str):
        from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

        self.name, self.device = f"hf {dtype}", device
        torch_dtype = TORCH_DTYPES[dtype]
        if spec.kind == "7b-random":
            from llama_gen.model import ModelArgs

            args = ModelArgs(**SEVEN_B)
            config = LlamaConfig(
                hidden_size=args.dim,
                num_hidden_layers=args.n_layers,
                num_attention_heads=args.n_heads,
                num_key_value_heads=args.kv_heads,
                intermediate_size=args.ffn_hidden_dim,
                vocab_size=args.vocab_size,
            )
            with torch.device(device):
                model = LlamaForCausalLM._from_config(config, dtype=torch_dtype)
        elif spec.gguf_file:
            model = AutoModelForCausalLM.from_pretrained(spec.hf_dir, gguf_file=spec.gguf_file, dtype=torch_dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(spec.hf_dir, dtype=torch_dtype)
        self.model = model.to(device).eval()
        self.model.generation_config.eos_token_id = None  # decode exactly new_tokens
        params = list(self.model.parameters())
        self.weights_bytes = tensor_bytes(params)
        embed = self.model.get_input_embeddings().weight
        tied = self.model.get_output_embeddings().weight.data_ptr() == embed.data_ptr()
        self.read_bytes_per_token = self.weights_bytes - (0 if tied else tensor_bytes([embed]))
        cfg = self.model.config
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.kv_per_token = 2 * cfg.num_hidden_layers * kv_heads * head_dim * embed.element_size()

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        ids = torch.tensor(prompts, device=self.device)
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        sync(self.device)
        self.kv_bytes = max(self.kv_bytes, self.kv_per_token * out.numel())  # a dynamic cache: as long as used
        return out[:, ids.shape[1] :].tolist()


# ---- llama.cpp ----------------------------------------------------------------------------------------


class LlamaCpp(Engine):
    max_batch = 1  # llama-cpp-python's Llama object decodes one sequence

    def __init__(self, spec: ModelSpec, threads: int, max_seq_len: int, device: str):
        import llama_cpp as lc
        import numpy as np
        from llama_cpp import Llama as CppLlama

        self.lc, self.np = lc, np
        self.name = f"llama.cpp {Path(spec.gguf_file).stem.rsplit('.', 1)[-1]}"
        self.llm = CppLlama(
            model_path=spec.gguf_path,
            n_ctx=max_seq_len,
            n_threads=threads,
            n_threads_batch=threads,
            n_batch=512,
            n_ubatch=512,
            n_gpu_layers=-1 if device.startswith("cuda") else 0,
            verbose=False,
        )
        self.weights_bytes, self.read_bytes_per_token, layers, kv_dim = gguf_sizes(spec.gguf_path)
        self.kv_bytes = 2 * layers * kv_dim * max_seq_len * 2  # f16 K and V for n_ctx positions

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        if len(prompts) > 1:
            raise NotImplementedError("llama-cpp-python decodes one sequence at a time")
        llm = self.llm
        llm.reset()
        llm.eval(prompts[0])
        out = []
        for i in range(new_tokens):
            # the last position's logits through the C API, as LlamaCppBatched reads them: Llama.scores keeps rows
            # only with logits_all=True (llama-cpp-python >= 0.3), and without it reads zeros (every step fed token 0)
            logits = self.np.ctypeslib.as_array(self.lc.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
            token = int(self.np.argmax(logits))
            out.append(token)
            if i + 1 < new_tokens:
                llm.eval([token])
        return [out]


class LlamaCppBatched(Engine):
    """llama.cpp decoding up to max_batch sequences together, one ``llama_decode`` per step for all of them (its
    C API through llama-cpp-python's bindings: one sequence id per row, as llama.cpp's own batched example and
    server do); the high-level ``Llama`` object decodes one sequence only."""

    def __init__(self, spec: ModelSpec, threads: int, max_seq_len: int, max_batch: int, device: str):
        import llama_cpp as lc
        import numpy as np

        self.lc, self.np, self.max_batch = lc, np, max_batch
        self.name = f"llama.cpp {Path(spec.gguf_file).stem.rsplit('.', 1)[-1]} (batched)"
        lc.llama_backend_init()
        model_params = lc.llama_model_default_params()
        model_params.n_gpu_layers = -1 if device.startswith("cuda") else 0
        self.model = lc.llama_model_load_from_file(spec.gguf_path.encode(), model_params)
        params = lc.llama_context_default_params()
        params.n_ctx, params.n_seq_max = max_seq_len * max_batch, max_batch
        params.n_batch = params.n_ubatch = 512
        params.n_threads = params.n_threads_batch = threads
        # flash attention off, as llama-cpp-python's Llama object (the single-sequence engine) has it: the context
        # default ("auto") turns it on, which on CPU rounds the queries to fp16 and changed the default model's very
        # first greedy token; with it off both engines give the same tokens (at batch 8 no faster either way)
        params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = lc.llama_init_from_model(self.model, params)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(512, 0, 1)
        self.weights_bytes, self.read_bytes_per_token, layers, kv_dim = gguf_sizes(spec.gguf_path)
        self.kv_bytes = 2 * layers * kv_dim * max_seq_len * max_batch * 2  # f16 K and V

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of rows (token, position, sequence id, whether its logits are wanted)."""
        batch = self.batch
        batch.n_tokens = len(rows)
        for i, (token, pos, seq, wanted) in enumerate(rows):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, wanted
            batch.seq_id[i][0] = seq
        if self.lc.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, i: int) -> int:
        logits = self.np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
        return int(logits.argmax())

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        outs = []
        for seq, prompt in enumerate(prompts):  # each prompt's prefill, in chunks of n_batch
            for start in range(0, len(prompt), 512):
                chunk = prompt[start : start + 512]
                self._decode([(t, start + j, seq, start + j == len(prompt) - 1) for j, t in enumerate(chunk)])
            outs.append([self._argmax(len(chunk) - 1)])
        for step in range(1, new_tokens):  # one llama_decode per step for every sequence
            self._decode([(out[-1], len(p) + step - 1, seq, True) for seq, (p, out) in enumerate(zip(prompts, outs))])
            for i, out in enumerate(outs):
                out.append(self._argmax(i))
        return outs


def requantized_gguf(src: str, dst: str, kind: str = "Q8_0") -> str:
    """Writes ``dst``: the GGUF file ``src`` with every 2-D tensor dequantized and quantized again to ``kind``
    (the gguf package's reference quantizer, as llama.cpp's), all metadata copied; returns dst. Made once."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants

    if Path(dst).is_file():
        return dst
    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(dst + ".partial", arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub_type)
    writer.add_file_type({"Q8_0": 7, "Q4_0": 2, "Q4_1": 3}[kind])  # llama.cpp's LLAMA_FTYPE_MOSTLY_*
    target = GGMLQuantizationType[kind]
    for tensor in reader.tensors:
        data = quants.dequantize(tensor.data, GGMLQuantizationType(tensor.tensor_type))
        data = np.asarray(data, dtype=np.float32).reshape([int(d) for d in reversed(tensor.shape)])
        qtype = target if data.ndim == 2 else GGMLQuantizationType.F32
        writer.add_tensor(tensor.name, quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    Path(dst + ".partial").replace(dst)
    return dst


def gguf_sizes(path: str) -> tuple[int, int, int, int]:
    """Returns (tensor bytes, bytes read per decoded token, layers, K width) of a GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    total = sum(sizes.values())
    read = total - (sizes["token_embd.weight"] if "output.weight" in sizes else 0)
    layers = len({n.split(".")[1] for n in sizes if n.startswith("blk.")})
    kv_dim = next(int(t.shape[1]) for t in reader.tensors if t.name == "blk.0.attn_k.weight")  # ggml order: [in, out]
    return total, read, layers, kv_dim


def make_engine(
    name: str, spec: ModelSpec, device: str, threads: int, max_seq_len: int, max_batch: int, compile: bool
) -> Engine:
    """name: ``ours:fp32`` / ``ours:int8`` / ``ours:int4-g32`` / ``ours:q4_1`` / ``ours:fp32@1`` (built with
    max_batch_size=1) / ``hf:fp32`` / ``llamacpp`` (the model's GGUF) / ``llamacpp:Q8_0`` (it requantized) /
    ``llamacpp-batched`` (the model's GGUF, several sequences per step)."""
    kind, _, variant = name.partition(":")
    if kind == "ours":
        variant, _, built_for = variant.partition("@")
        engine = Ours(spec, variant, device, max_seq_len, int(built_for or max_batch), compile)
        if built_for:
            engine.name += f" built for batch {built_for}"
        return engine
    if kind == "hf":
        return HF(spec, variant, device)
    if kind == "llamacpp":
        if variant:  # llamacpp:Q8_0: the same weights requantized by the gguf package (made once, next to the cache)
            made = (
                Path.home() / ".cache" / "llama_gen" / f"{Path(spec.gguf_file).stem.rsplit('.', 1)[0]}.{variant}.gguf"
            )
            made.parent.mkdir(parents=True, exist_ok=True)
            requantized_gguf(spec.gguf_path, str(made), variant)
            spec = ModelSpec(kind=spec.kind, hf_dir=str(made.parent), gguf_file=made.name)
        return LlamaCpp(spec, threads, max_seq_len, device)
    if kind == "llamacpp-batched":  # every batch size in one context (sequence ids), the GGUF's own blocks
        return LlamaCppBatched(spec, threads, max_seq_len, max_batch, device)
    raise ValueError(f"unknown engine {name!r}")


def dump(obj, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result
