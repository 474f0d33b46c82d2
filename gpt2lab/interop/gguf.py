"""GGUF export for llama.cpp's `gpt2` architecture (llama.cpp, Ollama, LM Studio), through the `gguf`
package, llama.cpp's own Python writer.

What llama.cpp's gpt2 loader expects (its convert_hf_to_gguf.py and gguf-py's constants):
  tensors   token_embd, position_embd, output_norm.{weight,bias}, output (absent when tied: llama.cpp
            then uses token_embd), blk.N.attn_norm, blk.N.attn_qkv, blk.N.attn_output, blk.N.ffn_norm,
            blk.N.ffn_up, blk.N.ffn_down (weights and biases): nn.Linear's (out, in) layout, which is ours
  metadata  gpt2.context_length / embedding_length / feed_forward_length / block_count /
            attention.head_count / attention.layer_norm_epsilon, general.file_type
  tokenizer tokenizer.ggml.model "gpt2" (byte-level BPE), tokenizer.ggml.pre "gpt-2" (GPT-2's regex),
            tokens as GPT-2's byte->unicode strings, one per embedding row ("[PAD<i>]", type UNUSED, for
            padding rows), token types (special tokens CONTROL), merges "a b", bos/eos/padding ids,
            and a fine-tuned model's chat_template
llama.cpp's converter recognises a pre-tokenizer by hashing how a known vocabulary encodes a test
string, so it cannot convert a vocabulary `gpt2lab tokenizer train` made; writing the file directly can,
since the pre-tokenizer (GPT-2's regex) is stated, not guessed.

Types (--outtype): f32 (exact), f16, q8_0 (blocks of 32 weights and one scale). As llama.cpp's
converter does, 1-D tensors (norms, biases) and the position table stay f32, and a matrix whose rows
are not a multiple of the quantization block falls back to f16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gpt2lab.bpe import EOT
from gpt2lab.errors import UserError
from gpt2lab.interop.hf import HF_CONVERTIBLE, check_convertible
from gpt2lab.model import GPT
from gpt2lab.tokenizer import AddedTokens, BPETokenizer, Tokenizer

OUTTYPES = ("f32", "f16", "q8_0")
# llama.cpp's gpt2 graph: learned positions, pre-LN blocks, GELU with the tanh approximation (ggml_gelu).
GGUF_CONVERTIBLE = {**HF_CONVERTIBLE, "activation": ("gelu_tanh",)}
BLOCK = {  # our parameter name inside a block -> llama.cpp's tensor name
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}
TOP = {"transformer.wte": "token_embd", "transformer.wpe": "position_embd", "transformer.ln_f": "output_norm",
       "lm_head": "output"}  # fmt: skip


def gguf_name(name: str) -> str:
    """Our parameter name -> llama.cpp's GGUF name (transformer.h.3.ln_1.bias -> blk.3.attn_norm.bias)."""
    module, _, kind = name.rpartition(".")
    if module in TOP:
        return f"{TOP[module]}.{kind}"
    parts = module.split(".")
    if parts[:2] == ["transformer", "h"] and ".".join(parts[3:]) in BLOCK:
        return f"blk.{parts[2]}.{BLOCK['.'.join(parts[3:])]}.{kind}"
    raise UserError(f"parameter {name!r} has no GGUF gpt2 tensor")


def gguf_tensors(model: GPT) -> dict[str, np.ndarray]:
    """The model's tensors under GGUF names, float32 numpy, zero biases for a bias-free model."""
    from gpt2lab.interop.hf import with_biases

    # nn.Linear's (out, in) layout is llama.cpp's; a tied head is left out (llama.cpp reuses token_embd).
    return {gguf_name(name): t.float().contiguous().numpy() for name, t in with_biases(model).items()}


def vocabulary(tok: Tokenizer, rows: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) for tokenizer.ggml.*: one token per embedding row."""
    import gguf

    base = tok.base if isinstance(tok, AddedTokens) else tok
    if not isinstance(base, BPETokenizer):
        raise UserError(
            f"tokenizer {tok.name!r} is not byte-level BPE: llama.cpp's gpt2 tokenizer cannot reproduce it "
            f"(export to Hugging Face instead)"
        )
    from gpt2lab.bpe import pattern_name

    if pattern_name(base.bpe.pattern) != "gpt2":
        raise UserError(
            f"tokenizer {tok.name!r} splits text with another regex than GPT-2's; llama.cpp has no such "
            "pre-tokenizer"
        )
    encoder = base.bpe.gpt2_encoder()
    tokens = [f"[PAD{i}]" for i in range(rows)]
    types = [int(gguf.TokenType.UNUSED)] * rows
    for text, i in encoder.items():
        tokens[i], types[i] = text, int(gguf.TokenType.NORMAL)
    for text, i in tok.special_tokens.items():
        tokens[i], types[i] = text, int(gguf.TokenType.CONTROL)
    merges = [f"{a} {b}" for a, b in base.bpe.gpt2_merges()]
    return tokens, types, merges


def save_gguf(
    model: GPT, tokenizer: Tokenizer, out: str | Path, outtype: str = "f32", name: str = ""
) -> Path:
    """Write `out` (.gguf) for llama.cpp's gpt2 architecture; refuses what llama.cpp cannot compute."""
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF export needs the gguf package: pip install gguf") from None
    from gpt2lab import sft
    from gpt2lab.atomic import atomic_write

    if outtype not in OUTTYPES:
        raise UserError(f"--outtype must be one of {OUTTYPES}, got {outtype!r}")
    cfg = model.config
    check_convertible(cfg, GGUF_CONVERTIBLE, "GGUF (llama.cpp's gpt2)")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(
            f"tokenizer has {tokenizer.vocab_size} tokens, more than the model's {cfg.vocab_size} rows"
        )
    tokens, types, merges = vocabulary(tokenizer, cfg.vocab_size)
    tensors = gguf_tensors(model)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]  # fmt: skip

    def write(path: Path) -> None:
        w = gguf.GGUFWriter(path, "gpt2")
        w.add_name(name or "gpt2lab model")
        w.add_context_length(cfg.block_size)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(cfg.mlp_size)
        w.add_block_count(cfg.n_layer)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
        w.add_file_type(int(file_type))
        if outtype == "q8_0":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        eot = tokenizer.special_tokens[EOT]
        w.add_bos_token_id(eot)
        w.add_eos_token_id(eot)
        w.add_pad_token_id(eot)
        w.add_add_bos_token(False)
        if all(t in tokenizer.special_tokens for t in sft.TEMPLATE_TOKENS):
            from gpt2lab.interop.hf_tokenizer import chat_template

            w.add_eot_token_id(tokenizer.special_tokens[sft.END])  # end of a chat turn
            w.add_chat_template(chat_template())
        for tname, data in tensors.items():
            qtype = _qtype(tname, data, outtype)
            if qtype == gguf.GGMLQuantizationType.F32:
                w.add_tensor(tname, data)
            else:
                w.add_tensor(tname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, write)
    return out


def _qtype(name: str, data: np.ndarray, outtype: str) -> Any:
    import gguf

    T = gguf.GGMLQuantizationType
    if outtype == "f32" or data.ndim == 1 or name.startswith("position_embd"):
        return T.F32
    if outtype == "q8_0":
        block, _ = gguf.GGML_QUANT_SIZES[T.Q8_0]
        if data.shape[-1] % block == 0:
            return T.Q8_0
    return T.F16


def read_gguf(path: str | Path) -> dict[str, Any]:
    """{"fields": {key: value}, "tensors": {name: float32 array in (out, in) layout}} of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {}
    for key, field in reader.fields.items():
        fields[key] = field.contents()
    tensors = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = np.asarray(data, dtype=np.float32).reshape([int(n) for n in reversed(t.shape)])
    return {"fields": fields, "tensors": tensors}
