"""The model ladder on names.txt: every rung trained by its recipe, scored on every token of val and test.

    python bench/ladder.py                      # all rungs, the recipes as written (CPU: about half an hour)
    python bench/ladder.py --rungs names-mlp --max-steps 200 --work /tmp/ladder
    python bench/ladder.py --corpus shakespeare # then text: the same models on char tinyshakespeare

Prepares ../shared/data/names.txt as the recipes say (unless --work already holds it), trains each
recipe through gpt2lab's train.run (the same loop as `gpt2lab train --recipe NAME`), scores the final
checkpoint with evaluate_loss in the windows it trained with (names: document rows), and prints a
markdown table beside the makemore lectures' published figures, then a few samples per rung. The
losses do not depend on the machine's load; the times do (the table says what the load was).

--corpus shakespeare prepares ../shared/data/tinyshakespeare.txt with the char tokenizer (nanoGPT's
90/10 cut; no test split) and trains the same recipes with the overrides in TEXT (stream windows of
64 characters, as the GPT rung's `shakespeare-char` recipe reads them), each a flag away on the
command line, e.g. `gpt2lab train --recipe names-mlp --data data/shakespeare-char --windows stream
--block-size 64 --batch-size 64 --max-steps 3000`.
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

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

# recipe: (rung, the lectures' published loss or None, where it is published). The bigram's figure is
# the loss over all 32,033 names (train included), as the lecture computes it; the others are val losses.
LADDER = {
    "names-bigram": ("counting bigram (add-1)", 2.4544, "makemore part 1: 2.4544 (~2.45), all names"),
    "names-neural-bigram": ("neural bigram", None, "makemore part 1: converges to the counts"),
    "names-mlp": ("MLP, context 3, 200 hidden", 2.105, "makemore part 5 (and part 3): 2.105"),
    "names-wavenet": ("WaveNet-style, 76K params", 1.993, "makemore part 5: 1.993"),
    "names-gpt": ("transformer (GPT)", None, "below the WaveNet"),
}

# --corpus shakespeare, then text: the same recipes, each with the overrides below (train fields, and
# "model" fields): rows are windows of 64 consecutive characters anywhere in the text (stream), for
# every rung alike, the transformer included; beside them the shakespeare-char recipe (nanoGPT's CPU
# "baby GPT") as written: a bigger model, trained on 768 characters a step rather than 4,096.
STREAM = {"windows": "stream", "batch_size": 64, "max_steps": 3000, "eval_interval": 1000}
STREAM["model"] = {"block_size": 64}
TEXT = {
    "names-bigram": (
        "counting bigram (add-1)",
        None,
        "-",
        {"windows": "stream", "model": {"block_size": 64}},
    ),
    "names-neural-bigram": ("neural bigram", None, "converges to the counts", {**STREAM, "max_steps": 600}),
    "names-mlp": ("MLP, context 3, 200 hidden", None, "-", STREAM),
    "names-wavenet": ("WaveNet-style, context 8", None, "-", STREAM),
    "names-gpt": ("transformer (GPT, 4 x 64)", None, "-", STREAM),
    "shakespeare-char": ("baby GPT (4 x 128), its recipe", 1.88, "nanoGPT's CPU baby GPT: 1.88", {}),
}
CORPORA = {  # corpus -> (file in ../shared/data, prepare settings, rungs)
    "names": ("names.txt", {"separator": "line"}, {k: (*v, {}) for k, v in LADDER.items()}),
    "shakespeare": ("tinyshakespeare.txt", {}, TEXT),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", default="names", choices=list(CORPORA), help="names.txt or char text")
    parser.add_argument("--source", default=None, help="the corpus file (default: ../shared/data's)")
    parser.add_argument("--work", default=None, help="prepared data and one run directory per rung")
    parser.add_argument("--rungs", nargs="+", default=None, choices=list(dict.fromkeys([*LADDER, *TEXT])))
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

    filename, prepare_settings, ladder = CORPORA[args.corpus]
    work = Path(args.work or f"out/ladder-{args.corpus}")
    data = work / "data"
    source = args.source or str(SHARED / filename)
    prepare(PrepareConfig(source=source, out=str(data), tokenizer="char", **prepare_settings))
    manifest = read_manifest(data)
    tok = get_tokenizer(manifest["tokenizer"])
    splits = [s for s in ("val", "test") if s in manifest["splits"]]
    prompt, sample_len = ([tok.eot_id], 20) if args.corpus == "names" else (tok.encode("\n"), 60)
    results = []
    for recipe in args.rungs or list(ladder):
        if recipe not in ladder:
            parser.error(f"--corpus {args.corpus} has the rungs {list(ladder)}")
        fields = load_recipe(recipe)
        overrides = dict(ladder[recipe][3])
        fields["model"] = {**fields["model"], **overrides.pop("model", {})}
        if fields["model"].get("fit") == "counts":  # one step: the pass of counts
            overrides.pop("max_steps", None)
        fields.update(overrides, data=str(data), out_dir=str(work / recipe), device=args.device)
        fields.update(sample_tokens=0)
        if args.max_steps is not None and fields["model"].get("fit") != "counts":
            fields.update(max_steps=args.max_steps, eval_interval=0)
        t0 = time.perf_counter()
        summary = train(TrainConfig(**fields))
        seconds = time.perf_counter() - t0
        model = load_model(resolve(work / recipe)).to(args.device)
        windows = fields.get("windows", "stream")  # scored in the rows it trained on
        scores = {
            split: evaluate_loss(model, data, split, 256, device=args.device, windows=windows)["loss"]
            for split in splits
        }
        samples = generate(
            model,
            prompt,
            sample_len,
            num_samples=args.samples,
            seed=0,
            eot_id=tok.eot_id,
            vocab_size=tok.vocab_size,
            temperature=1.0,
        )
        samples = [tok.decode([t for t in n if t != tok.eot_id]) for n in samples]
        results.append((recipe, model.num_params(), summary["step"], scores, seconds, samples))
        shown = ", ".join(f"{split} {loss:.4f}" for split, loss in scores.items())
        print(f"{recipe}: {shown} ({seconds:.0f} s)", flush=True)

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    print(
        f"\n{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)\n"
    )
    reference = "lecture (val)" if args.corpus == "names" else "reference (val)"
    print(f"| rung | recipe | parameters | steps | val loss | test loss | {reference} | train time |")
    print("|---|---|---:|---:|---:|---:|---|---:|")
    for recipe, params, steps, scores, seconds, _ in results:
        rung, figure, source, _ = ladder[recipe]
        mark = "" if figure is None else (" (at or below)" if scores["val"] <= figure else " (ABOVE)")
        val = f"{scores['val']:.4f}{mark}"
        test = f"{scores['test']:.4f}" if "test" in scores else "-"
        print(
            f"| {rung} | `{recipe}` | {params:,} | {steps:,} | {val} | {test} | {source} "
            f"| {seconds / 60:.1f} min |"
        )
    print()
    for recipe, *_, samples in results:
        print(f"- `{recipe}`: {', '.join(repr(s) if args.corpus != 'names' else s for s in samples)}")


if __name__ == "__main__":
    main()
