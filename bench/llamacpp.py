"""llama.cpp on a GGUF that `gpt2lab convert --format gguf` wrote: the same prompt tokens and greedy tokens as
gpt2lab. Needs llama-cpp-python (`pip install llama-cpp-python`: it compiles llama.cpp, minutes on 2 cores),
which is why this is a bench script and not a test. Prints a markdown table.

    python bench/llamacpp.py --ckpt out/run --gpt2-vocab ../shared/data/gpt2
    python bench/llamacpp.py --gpt2-vocab ../shared/data/gpt2   # no --ckpt: a random model, clear argmaxes

Greedy decoding in llama.cpp (temperature 0, no penalties) takes the argmax over all embedding rows; gpt2lab
takes it over the tokenizer's ids. The two agree as long as no padding row wins, which a trained model's
padding rows (never targets) do not.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from datetime import date
from pathlib import Path

import torch

PROMPTS = [
    "Once upon a time",
    "The meaning of life is",
    "ROMEO:\nO, she doth teach the torches",
    "In 1905, Albert Einstein published",
    "def fibonacci(n):",
    "<|endoftext|>The",
    "Lily and Ben went to the park. They saw a big",
    "Q: What is the capital of France?\nA:",
]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=None, help="gpt2lab checkpoint or run (default: a random model)")
    ap.add_argument("--gpt2-vocab", default=None, help="folder with encoder.json + vocab.bpe")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--outtypes", default="f32,f16,q8_0")
    args = ap.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("bench/llamacpp.py needs llama-cpp-python: pip install llama-cpp-python") from None

    from gpt2lab import GPT, GPTConfig
    from gpt2lab.checkpoint import load_model, read_config
    from gpt2lab.generate import generate
    from gpt2lab.interop.gguf import save_gguf
    from gpt2lab.tokenizer import get_tokenizer, model_tokenizer

    if args.ckpt:
        model = load_model(args.ckpt)
        tok = model_tokenizer(read_config(args.ckpt).get("tokenizer"), args.gpt2_vocab)
        what = args.ckpt
    else:
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=50304)).eval()
        with torch.no_grad():
            model.transformer.wte.weight.mul_(25)  # clear argmaxes: no near-ties for kernels to flip
        tok = get_tokenizer("gpt2", vocab_dir=args.gpt2_vocab)
        what = "random GPT-2-vocabulary model, 4 x 128"
    prompts = [tok.encode(p, allowed_special="all") for p in PROMPTS]
    ours = [
        generate(model, ids, args.new_tokens, temperature=0, eot_id=tok.eot_id, vocab_size=tok.vocab_size)
        for ids in prompts
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for outtype in args.outtypes.split(","):
            path = save_gguf(model, tok, Path(tmp) / f"m-{outtype}.gguf", outtype)
            llm = llama_cpp.Llama(str(path), n_ctx=model.config.block_size, verbose=False, seed=0)
            same_prompt = same_tokens = 0
            first_diff = []
            for text, ids, want in zip(PROMPTS, prompts, ours, strict=True):
                theirs_prompt = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
                same_prompt += theirs_prompt == ids
                llm.reset()
                got = []
                for t in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
                    got.append(int(t))
                    if t == tok.eot_id or len(got) == args.new_tokens:
                        break
                same_tokens += got == want
                if got != want:
                    pairs = zip(got, want, strict=False)  # lengths differ when one stopped early
                    first_diff.append(str(next((i for i, (a, b) in enumerate(pairs) if a != b), len(got))))
            rows.append(
                (outtype, same_prompt, same_tokens, ", ".join(first_diff) or "-", path.stat().st_size)
            )
            del llm
    print(f"model: {what}; {len(PROMPTS)} prompts, {args.new_tokens} greedy tokens each")
    versions = f"torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}"
    print(f"{date.today()}, {platform.machine()} CPU, {versions}\n")
    print(
        "| GGUF type | file MB | prompts tokenized identically | greedy tokens identical | first divergence |"
    )
    print("|---|---:|---:|---:|---|")
    for outtype, sp, st, diff, size in rows:
        n = len(PROMPTS)
        print(f"| {outtype} | {size / 1e6:.1f} | {sp}/{n} | {st}/{n} | {diff} |")


if __name__ == "__main__":
    main()
