"""The model ladder (docs/ladder.md): names.txt prepared as the lectures split it, every rung through the
same train / resume / eval / sample commands, and each rung checked against the lectures' own math."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt2lab.checkpoint import load_model, read_config, resolve, save_checkpoint
from gpt2lab.cli import main
from gpt2lab.config import (
    GPTConfig,
    MLPConfig,
    PrepareConfig,
    TrainConfig,
    WaveNetConfig,
    load_recipe,
    model_config_from_dict,
)
from gpt2lab.dataloader import ShardLoader
from gpt2lab.documents import TokenStream, read_rows, rows
from gpt2lab.errors import UserError
from gpt2lab.evaluate import evaluate_loss
from gpt2lab.generate import generate
from gpt2lab.ladder import MLPModel, WaveNet, build_model
from gpt2lab.model import GPT
from gpt2lab.shards import read_manifest

EOT = 26  # the char tokenizer of names.txt: a-z are 0-25, <|endoftext|> is 26 (the lectures' '.' is 0)


def lecture_split(path: Path) -> tuple[list[str], list[str], list[str]]:
    """makemore part 2's split, as the lecture writes it."""
    words = path.read_text().splitlines()  # open('names.txt', 'r').read().splitlines()
    random.seed(42)
    random.shuffle(words)
    n1, n2 = int(0.8 * len(words)), int(0.9 * len(words))
    return words[:n1], words[n1:n2], words[n2:]


@pytest.fixture(scope="module")
def names(tmp_path_factory) -> Path:
    """../shared/data/names.txt prepared as the README says (skips on a clone without the shared data)."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "names.txt"
    if not path.is_file():
        pytest.skip(f"names.txt not found at {path}")
    out = tmp_path_factory.mktemp("names") / "data"
    assert main(["prepare", str(path), "--separator", "line", "--tokenizer", "char", "--out", str(out)]) == 0
    return out


def encode(word: str) -> list[int]:
    return [ord(c) - ord("a") for c in word]


def split_tokens(data: Path, split: str) -> np.ndarray:
    m = read_manifest(data)
    return TokenStream.of_split(data, m, split).read(0, m["splits"][split]["tokens"])


# --- data: the lectures' split, every target once ------------------------------------------------


def test_prepare_names_is_the_lectures_split_framed_by_eot(names, shared_data):
    train, val, test = lecture_split(shared_data / "names.txt")
    m = read_manifest(names)
    assert (m["vocab_size"], m["eot_id"], sorted(m["splits"])) == (27, EOT, ["test", "train", "val"])
    for split, words in (("train", train), ("val", val), ("test", test)):
        expected = [t for w in words for t in [EOT, *encode(w)]] + [EOT]  # every name framed by EOT
        assert split_tokens(names, split).tolist() == expected
        assert m["splits"][split]["documents"] == len(words)
    # The lectures' example counts (Xtr, Xdev, Xte): one target per character and one per name's end.
    assert [m["splits"][s]["tokens"] - 1 for s in ("train", "val", "test")] == [182625, 22655, 22866]


def test_small_shards_hold_the_same_split(names, tmp_path):
    """Documents and the closing EOT cut across shard boundaries: the same tokens, split by split."""
    args = ["--separator", "line", "--tokenizer", "char", "--shard-tokens", "5000"]
    source = read_manifest(names)["settings"]["source"]
    assert main(["prepare", source, *args, "--out", str(tmp_path / "small")]) == 0
    m = read_manifest(tmp_path / "small")
    assert len(m["splits"]["val"]["shards"]) == 5  # 22,656 tokens
    for split in ("train", "val", "test"):
        assert np.array_equal(split_tokens(tmp_path / "small", split), split_tokens(names, split))
        assert m["splits"][split]["documents"] == read_manifest(names)["splits"][split]["documents"]


def test_split_options_are_checked():
    assert PrepareConfig(source="a", out="b", separator="line").split == "80/10/10"
    assert PrepareConfig(source="a", out="b", separator="line", split="90/10").split_fractions() == (0.9, 1.0)
    for bad in ("80", "80/x/10", "0/50/50", "80/10/-1", "1/2/3/4"):
        with pytest.raises(UserError, match="--split"):
            PrepareConfig(source="a", out="b", split=bad)
    with pytest.raises(UserError, match="not both"):
        PrepareConfig(source="a", out="b", split="80/20", val_fraction=0.1)


def test_rows_cover_every_target_once_and_document_rows_stay_inside_a_document():
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 9, size=rng.integers(1, 30)).tolist() for _ in range(40)]
    tokens = np.array([t for d in docs for t in [9, *d]] + [9], dtype=np.uint16)
    starts = {i for i, t in enumerate(tokens.tolist()) if t == 9}
    for cut in (len(tokens), 57, 200):  # one shard, or documents crossing a shard boundary
        stream = TokenStream([tokens[:cut], tokens[cut:]])
        for layout in ("stream", "document"):
            table = rows(stream, 8, layout, eot_id=9)
            x, y = read_rows(stream, table, 8)
            seen = np.concatenate([np.arange(a + 1, a + n + 1) for a, n in table.tolist()])
            assert sorted(seen.tolist()) == list(range(1, len(tokens)))  # each target exactly once
            assert (y[y != -100] == torch.from_numpy(tokens[seen].astype(np.int64))).all()
            if layout == "document":  # a row never holds an EOT but at its start (its document's own)
                for (a, n), row in zip(table.tolist(), x.tolist(), strict=True):
                    assert all(a + i not in starts for i in range(1, n)), row


# --- each rung is the lectures' model -------------------------------------------------------------


def lecture_examples(words: list[str], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """makemore part 2's build_dataset, with '.' as our EOT id."""
    X, Y = [], []
    for w in words:
        context = [EOT] * block_size
        for ix in [*encode(w), EOT]:
            X.append(context)
            Y.append(ix)
            context = context[1:] + [ix]
    return torch.tensor(X), torch.tensor(Y)


def test_mlp_val_loss_is_the_lectures_loss_on_their_examples(names, shared_data):
    """Document rows + EOT before a row's start = the lecture's examples, each context padded with '.'."""
    torch.manual_seed(0)
    model = MLPModel(MLPConfig(eot_id=EOT)).eval()
    _, val, _ = lecture_split(shared_data / "names.txt")
    X, Y = lecture_examples(val, 3)
    with torch.no_grad():  # the lecture's forward: emb = C[X]; h = tanh(emb.view(-1, 30) @ W1 + b1); ...
        emb = model.wte.weight[X].view(len(X), -1)
        h = torch.tanh(emb @ model.hidden.weight.T + model.hidden.bias)
        expected = F.cross_entropy(h @ model.lm_head.weight.T + model.lm_head.bias, Y).item()
    got = evaluate_loss(model, names, "val", batch_size=256, windows="document")
    assert got["tokens"] == len(Y) == 22655
    assert got["loss"] == pytest.approx(expected, abs=1e-5)
    # Stream windows let a name see the end of the previous one: a different (not the lectures') number.
    assert evaluate_loss(model, names, "val", batch_size=256)["loss"] != pytest.approx(expected, abs=1e-4)


def test_wavenet_is_the_lectures_hierarchy_at_every_position():
    """The dilated convolution's top layer at position t = makemore part 5's tree over tokens t-7 .. t."""
    torch.manual_seed(0)
    model = WaveNet(WaveNetConfig(eot_id=EOT)).eval()
    with torch.no_grad():  # LayerNorm gains and biases away from 1 and 0, so that they count
        for layer in model.fuse:
            layer.norm.weight.normal_(1.0, 0.2)
            layer.norm.bias.normal_(0.0, 0.2)
    idx = torch.randint(0, 27, (5, 12))
    with torch.no_grad():
        logits = model(idx)  # (5, 12, 27)
        padded = F.pad(idx, (7, 0), value=EOT)
        for t in range(12):
            x = model.wte(padded[:, t : t + 8])  # (5, 8, 24): the lecture's Embedding
            for layer in model.fuse:  # FlattenConsecutive(2) -> Linear -> norm -> tanh
                x = x.reshape(len(x), x.size(1) // 2, -1)
                x = torch.tanh(layer.norm(x @ layer.linear.weight.T))
            assert torch.allclose(logits[:, t], model.lm_head(x[:, 0]), atol=1e-5)
    assert model.num_params() == 76579  # the lecture's figure
    with torch.no_grad():  # LayerNorm: a row's predictions do not depend on the rest of its batch
        assert torch.allclose(model(idx[2:3]), logits[2:3], atol=1e-6)


def assert_evaluates_and_samples(run: Path, names: Path, capsys, max_tokens: int | None = None) -> None:
    """`eval loss` on the run gives training's last val loss (over every val token, or the first
    max_tokens as training scored them); `sample` makes names."""
    capsys.readouterr()
    limit = [] if max_tokens is None else ["--max-tokens", str(max_tokens)]
    assert main(["eval", "loss", "--ckpt", str(run), "--data", str(names), *limit]) == 0
    assert f"| tokens | {max_tokens or 22655} |" in capsys.readouterr().out  # 22655: all of val
    val = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["val_loss"]
    evaluated = json.loads((run / f"eval_loss_{names.name}_val.json").read_text())
    assert evaluated["windows"] == "document" and evaluated["loss"] == pytest.approx(val, abs=1e-6)
    args = ["sample", "--ckpt", str(run), "--prompt", "", "--num-samples", "4", "--seed", "0"]
    assert main([*args, "--max-new-tokens", "15"]) == 0
    samples = [s.strip() for s in capsys.readouterr().out.split("-" * 40)]
    assert (
        len(samples) == 4
        and any(samples)
        and all(set(s) <= set("abcdefghijklmnopqrstuvwxyz") for s in samples)
    )


def test_counting_bigram_is_the_lectures_smoothed_counts(names, shared_data, tmp_path, capsys):
    train, val, _ = lecture_split(shared_data / "names.txt")
    N = np.zeros((27, 27))
    for w in train:
        chars = [EOT, *encode(w), EOT]
        for a, b in zip(chars, chars[1:], strict=False):
            N[a, b] += 1
    P = (N + 1) / (N + 1).sum(axis=1, keepdims=True)
    nll = [-math.log(P[a, b]) for w in val for a, b in zip([EOT, *encode(w)], [*encode(w), EOT], strict=True)]
    out = tmp_path / "bigram"
    assert main(["train", "--recipe", "names-bigram", "--data", str(names), "--out-dir", str(out)]) == 0
    model = load_model(out)
    assert torch.allclose(model.weight.double(), torch.from_numpy(np.log(P)), atol=1e-6)
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged["val_loss"] == pytest.approx(sum(nll) / len(nll), abs=1e-6)
    # Resuming a finished counting run does nothing and leaves it as it was.
    assert (
        main(["train", "--recipe", "names-bigram", "--data", str(names), "--out-dir", str(out), "--resume"])
        == 0
    )
    assert torch.equal(load_model(out).weight, model.weight)
    with pytest.raises(UserError, match="max_steps must be 1"):
        TrainConfig(**{**load_recipe("names-bigram"), "max_steps": 5})
    assert_evaluates_and_samples(out, names, capsys)


# --- every rung through the same commands ---------------------------------------------------------

RUNGS = ["names-neural-bigram", "names-mlp", "names-wavenet", "names-gpt"]
SMALLER = {"names-gpt": ["--n-layer", "2", "--n-head", "2", "--n-embd", "32"]}  # seconds, not minutes, in CI
TINY = ["--max-steps", "6", "--batch-size", "16", "--eval-interval", "3", "--checkpoint-interval", "3"]
TINY += ["--lr-decay-steps", "6", "--warmup-steps", "0", "--log-interval", "1", "--sample-tokens", "0"]
TINY += ["--eval-tokens", "4096"]  # the first 4096 val targets: seconds, not minutes, in CI


def train_losses(out: Path) -> dict[int, float]:
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e.get("train_loss", e.get("val_loss")) for e in events}


@pytest.mark.parametrize("recipe", RUNGS)
def test_every_rung_trains_resumes_exactly_evaluates_and_samples(recipe, names, tmp_path, capsys):
    common = ["--recipe", recipe, "--data", str(names), *TINY, *SMALLER.get(recipe, [])]
    assert main(["train", *common, "--out-dir", str(tmp_path / "straight")]) == 0
    assert main(["train", *common, "--out-dir", str(tmp_path / "split"), "--max-steps", "3"]) == 0
    assert main(["train", *common, "--out-dir", str(tmp_path / "split"), "--resume"]) == 0
    a, b = load_model(tmp_path / "straight").state_dict(), load_model(tmp_path / "split").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical weights
    assert train_losses(tmp_path / "straight") == train_losses(tmp_path / "split")
    family = load_recipe(recipe)["model"].get("family", "gpt")
    assert read_config(tmp_path / "straight")["model"].get("family", "gpt") == family
    assert read_config(tmp_path / "straight")["train"]["windows"] == "document"

    assert_evaluates_and_samples(tmp_path / "straight", names, capsys, max_tokens=4096)


def test_neural_bigram_converges_to_the_counting_bigram(names, tmp_path):
    common = ["--data", str(names), "--sample-tokens", "0", "--log-interval", "100", "--eval-interval", "0"]
    assert main(["train", "--recipe", "names-bigram", *common, "--out-dir", str(tmp_path / "counts")]) == 0
    common += ["--max-steps", "200"]  # the recipe's 600 end at 2.4561 (docs/ladder.md); 200 suffice here
    assert (
        main(["train", "--recipe", "names-neural-bigram", *common, "--out-dir", str(tmp_path / "grad")]) == 0
    )
    counts, grad = (
        evaluate_loss(load_model(tmp_path / r), names, "val", 512, windows="document")
        for r in ("counts", "grad")
    )
    assert abs(grad["loss"] - counts["loss"]) < 0.01


# --- then text: the same recipes on char tinyshakespeare, in stream windows ------------------------


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory) -> Path:
    """The first 100,000 characters of tinyshakespeare, prepared with the char tokenizer (90/10 cut)."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"tinyshakespeare.txt not found at {path}")
    root = tmp_path_factory.mktemp("shakespeare")
    (root / "text.txt").write_text(path.read_text()[:100_000])
    assert main(["prepare", str(root / "text.txt"), "--tokenizer", "char", "--out", str(root / "data")]) == 0
    return root / "data"


def test_the_ladder_runs_on_char_text_in_stream_windows(shakespeare, tmp_path, capsys):
    """docs/ladder.md "Then text": the names recipes, a flag away from Shakespeare. The counting bigram
    counts every adjacent pair of the train text once and scores every val token; the MLP and the
    WaveNet train, evaluate and sample with the text's vocabulary and EOT."""
    m = read_manifest(shakespeare)
    V, train_tokens, val_tokens = (
        m["vocab_size"],
        split_tokens(shakespeare, "train"),
        split_tokens(shakespeare, "val"),
    )
    N = np.zeros((V, V))
    np.add.at(N, (train_tokens[:-1], train_tokens[1:]), 1)
    log_p = np.log((N + 1) / (N + 1).sum(axis=1, keepdims=True))
    text = ["--data", str(shakespeare), "--windows", "stream", "--block-size", "32", "--sample-tokens", "0"]
    assert main(["train", "--recipe", "names-bigram", *text, "--out-dir", str(tmp_path / "bigram")]) == 0
    model = load_model(tmp_path / "bigram")
    assert model.weight.shape == (V, V) and torch.allclose(
        model.weight.double(), torch.from_numpy(log_p), atol=1e-6
    )
    logged = json.loads((tmp_path / "bigram" / "metrics.jsonl").read_text().splitlines()[-1])["val_loss"]
    assert logged == pytest.approx(-log_p[val_tokens[:-1], val_tokens[1:]].mean(), abs=1e-6)

    text += ["--max-steps", "4", "--batch-size", "8", "--eval-interval", "0", "--eval-tokens", "2048"]
    for recipe in ("names-mlp", "names-wavenet"):
        run = tmp_path / recipe
        assert main(["train", "--recipe", recipe, *text, "--out-dir", str(run)]) == 0
        model = load_model(run)
        assert (model.config.vocab_size, model.config.eot_id) == (V, m["eot_id"])
        assert read_config(run)["train"]["windows"] == "stream"
        assert (
            main(["eval", "loss", "--ckpt", str(run), "--data", str(shakespeare), "--max-tokens", "2048"])
            == 0
        )
        val = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["val_loss"]
        evaluated = json.loads((run / f"eval_loss_{shakespeare.name}_val.json").read_text())
        assert evaluated["loss"] == pytest.approx(val, abs=1e-6)
        args = ["sample", "--ckpt", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "40", "--seed", "0"]
        capsys.readouterr()
        assert main(args) == 0
        printed = capsys.readouterr().out.split("-" * 40)[0].strip()  # the prompt and its continuation
        assert printed.startswith("ROMEO:") and len(printed) > len("ROMEO:")


# --- eval loss --per-document ---------------------------------------------------------------------


def test_per_document_losses_are_each_names_own_loss(names, shared_data, tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model(MLPConfig(eot_id=EOT))
    spec = read_manifest(names)["tokenizer"]  # as training records it (no spec: GPT-2's, refused)
    ckpt = save_checkpoint(tmp_path / "mlp", model, {"train": {"windows": "document"}, "tokenizer": spec})
    out = tmp_path / "docs.jsonl"
    assert (
        main(
            [
                "eval",
                "loss",
                "--ckpt",
                str(ckpt),
                "--data",
                str(names),
                "--per-document",
                str(out),
                "--per-token",
            ]
        )
        == 0
    )
    assert "| documents | 3203" in capsys.readouterr().out
    records = [json.loads(line) for line in out.read_text().splitlines()]
    _, val, _ = lecture_split(shared_data / "names.txt")
    assert [r["text"] for r in records] == val and [r["document"] for r in records] == list(range(len(val)))
    total = evaluate_loss(model, names, "val", windows="document")
    assert sum(r["loss"] * r["tokens"] for r in records) / total["tokens"] == pytest.approx(
        total["loss"], abs=1e-9
    )
    with torch.no_grad():
        for r in records[:50:7]:  # a name scored alone: [EOT, *name] -> [*name, EOT]
            ids = encode(r["text"])
            alone = model(torch.tensor([[EOT, *ids]]), torch.tensor([[*ids, EOT]])).item()
            assert r["loss"] == pytest.approx(alone, abs=1e-5)
            assert r["token_texts"] == [*r["text"], "<|endoftext|>"] and len(r["token_losses"]) == r["tokens"]
            assert sum(r["token_losses"]) / r["tokens"] == pytest.approx(r["loss"], abs=1e-5)
    assert main(["eval", "loss", "--ckpt", str(ckpt), "--data", str(names), "--windows", "rows"]) == 2
    assert main(["eval", "loss", "--ckpt", str(ckpt), "--data", str(names), "--per-token"]) == 2


# --- the family in config.json, one dispatch, generation without a cache ----------------------------


def test_family_dispatch_and_old_checkpoints(tmp_path):
    for d in ({"family": "bigram", "fit": "counts"}, {"family": "mlp", "context": 5}, {"family": "wavenet"}):
        cfg = model_config_from_dict(d)
        assert model_config_from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["family"] == d["family"]
    assert isinstance(model_config_from_dict({"n_layer": 2}, "gpt2"), GPTConfig)
    with pytest.raises(UserError, match="unknown model family 'wavnet'.*did you mean 'wavenet'"):
        model_config_from_dict({"family": "wavnet"})
    with pytest.raises(UserError, match="unknown MLPConfig field 'n_head'"):
        model_config_from_dict({"family": "mlp", "n_head": 4})
    with pytest.raises(UserError, match="lora"):
        TrainConfig(model={"family": "mlp"}, method="lora")
    # A GPT checkpoint's config.json has no "family" (as every one written before the ladder): a GPT.
    gpt = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=9))
    path = save_checkpoint(tmp_path / "gpt", gpt)
    assert "family" not in read_config(path)["model"] and isinstance(load_model(resolve(path)), GPT)
    path = save_checkpoint(tmp_path / "wavenet", build_model({"family": "wavenet", "n_layer": 2}))
    assert isinstance(load_model(path), WaveNet) and load_model(path).config.context == 4
    # What needs GPT-2's layers refuses another family in one line.
    assert main(["convert", "--ckpt", str(path), "--out", str(tmp_path / "hf")]) == 2
    assert not (tmp_path / "hf").exists()
    with pytest.raises(UserError, match="fsdp"):
        TrainConfig(model={"family": "wavenet"}, fsdp=True)
    from gpt2lab.sft import add_template_tokens
    from gpt2lab.tokenizer import get_tokenizer

    with pytest.raises(UserError, match="chat examples needs a GPT"):
        add_template_tokens(load_model(path), get_tokenizer("bytes"))


def test_generation_without_a_kv_cache_recomputes_each_rows_window():
    torch.manual_seed(0)
    model = build_model({"family": "mlp", "block_size": 6}).eval()
    prompts = [[1, 2, 3, 4], [5], [EOT, 7, 8]]
    batched = generate(model, prompts, 12, temperature=0, eot_id=None)
    for prompt, got in zip(prompts, batched, strict=True):  # alone, and by hand: argmax of a full forward
        assert generate(model, prompt, 12, temperature=0, eot_id=None) == got
        seq = list(prompt)
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq[-6:]]))[0, -1].argmax()))
        assert seq[len(prompt) :] == got


def test_document_loader_rows_each_start_a_name_and_resume(names):
    loader = ShardLoader(names, "train", 32, 16, windows="document", mode="sequential")
    x, y = loader.next_batch()
    assert (x[:, 0] == EOT).all() and ((y == EOT).sum(dim=1) == 1).all()  # one whole name per row
    state = loader.state_dict()
    after = loader.next_batch()
    again = ShardLoader(names, "train", 32, 16, windows="document", mode="sequential")
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(again.next_batch(), after, strict=True))
    with pytest.raises(UserError, match="windows"):
        ShardLoader(names, "train", 32, 16, mode="sequential").load_state_dict(state)


def test_serve_answers_with_a_ladder_model(tmp_path):
    """The server's engine runs any family: the ladder's through the Decoder's recompute path."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from gpt2lab.config import ServeConfig
    from gpt2lab.server import create_app
    from gpt2lab.tokenizer import CharTokenizer

    torch.manual_seed(0)
    spec = CharTokenizer(list("abcdefghijklmnopqrstuvwxyz")).to_spec()
    ckpt = save_checkpoint(tmp_path / "wavenet", build_model({"family": "wavenet"}), {"tokenizer": spec})
    with TestClient(create_app(ServeConfig(ckpt=str(ckpt)))) as client:
        body = {"model": "wavenet", "prompt": "em", "max_tokens": 10, "n": 2, "seed": 1}
        first, again = (client.post("/v1/completions", json=body) for _ in range(2))
    assert first.status_code == 200 and first.json()["choices"] == again.json()["choices"]  # seeded
    texts = [c["text"] for c in first.json()["choices"]]
    assert len(texts) == 2 and all(set(t) <= set("abcdefghijklmnopqrstuvwxyz") for t in texts)
