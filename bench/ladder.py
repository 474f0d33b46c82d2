"""The model ladder on names.txt: every rung trained by its recipe, scored on every token of val and test.

    python bench/ladder.py                      # all rungs, the recipes as written (CPU: about an hour)
    python bench/ladder.py --rungs names-mlp --max-steps 200 --work /tmp/ladder

Prepares ../shared/data/names.txt as the recipes say (unless --work already holds it), trains each
recipe through gpt2lab's train.run (the same loop as `gpt2lab train --recipe NAME`), scores the final
checkpoint with evaluate_loss in document windows, and prints a markdown table beside the makemore
lectures' published figures, then a few sampled names per rung. The losses do not depend on the
machine's load; the times do (the table says what the load was).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from gpt2lab.checkpoint import load_model, resolve
from gpt2lab.config import PrepareConfig, TrainConfig, load_recipe
from gpt2lab.evaluate import evaluate_loss
from gpt2lab.generate import generate
from gpt2lab.shards import read_manifest
from gpt2lab.shards import run as prepare
from gpt2lab.tokenizer import get_tokenizer
from gpt2lab.train import run as train

NAMES = Path(__file__).resolve().parents[2] / "shared" / "data" / "names.txt"

# recipe: (rung, the lectures' published loss or None, where it is published). The bigram's figure is
# the loss over all 32,033 names (train included), as the lecture computes it; the others are val losses.
LADDER = {
    "names-bigram": ("counting bigram (add-1)", 2.4544, "makemore part 1: 2.4544 (~2.45), all names"),
    "names-neural-bigram": ("neural bigram", None, "makemore part 1: converges to the counts"),
    "names-mlp": ("MLP, context 3, 200 hidden", 2.105, "makemore part 5 (and part 3): 2.105"),
    "names-wavenet": ("WaveNet-style, 76K params", 1.993, "makemore part 5: 1.993"),
    "names-gpt": ("transformer (GPT)", None, "below the WaveNet"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--names", default=str(NAMES), help="names.txt (one name a line)")
    parser.add_argument("--work", default="out/ladder", help="prepared data and one run directory per rung")
    parser.add_argument("--rungs", nargs="+", default=list(LADDER), choices=list(LADDER))
    parser.add_argument(
        "--max-steps", type=int, default=None, help="override the recipes' steps (smoke runs)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=5, help="names sampled from each rung")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (1 on a CPU shared with other jobs)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(args.work)
    data = work / "data"
    prepare(PrepareConfig(source=args.names, out=str(data), separator="line", tokenizer="char"))
    tok = get_tokenizer(read_manifest(data)["tokenizer"])
    results = []
    for recipe in args.rungs:
        fields = load_recipe(recipe)
        fields.update(data=str(data), out_dir=str(work / recipe), device=args.device, sample_tokens=0)
        if args.max_steps is not None and fields["model"].get("fit") != "counts":
            fields.update(max_steps=args.max_steps, eval_interval=0)
        t0 = time.perf_counter()
        summary = train(TrainConfig(**fields))
        seconds = time.perf_counter() - t0
        model = load_model(resolve(work / recipe)).to(args.device)
        scores = {
            split: evaluate_loss(model, data, split, 256, device=args.device, windows="document")["loss"]
            for split in ("val", "test")
        }
        names = generate(
            model,
            [tok.eot_id],
            20,
            num_samples=args.samples,
            seed=0,
            eot_id=tok.eot_id,
            vocab_size=tok.vocab_size,
            temperature=1.0,
        )
        names = [tok.decode([t for t in n if t != tok.eot_id]) for n in names]
        results.append((recipe, model.num_params(), summary["step"], scores, seconds, names))
        print(f"{recipe}: val {scores['val']:.4f}, test {scores['test']:.4f} ({seconds:.0f} s)", flush=True)

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    print(
        f"\n{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)\n"
    )
    print("| rung | recipe | parameters | steps | val loss | test loss | lecture (val) | train time |")
    print("|---|---|---:|---:|---:|---:|---|---:|")
    for recipe, params, steps, scores, seconds, _ in results:
        rung, figure, source = LADDER[recipe]
        mark = "" if figure is None else (" (at or below)" if scores["val"] <= figure else " (ABOVE)")
        val = f"{scores['val']:.4f}{mark}"
        print(
            f"| {rung} | `{recipe}` | {params:,} | {steps:,} | {val} | {scores['test']:.4f} | {source} "
            f"| {seconds / 60:.1f} min |"
        )
    print()
    for recipe, *_, names in results:
        print(f"- `{recipe}`: {', '.join(names)}")


if __name__ == "__main__":
    main()
