"""Import and export GPT-2 in Hugging Face's layout, where OpenAI's released weights live.

The layout: config.json (GPT2Config) + model.safetensors (or pytorch_model.bin), tensor names
`transformer.h.0.attn.c_attn.weight`, ... (or the same without `transformer.`, as the hub's own
gpt2 files have them). The names are ours too; the one real difference is that GPT-2 stores its
four projections as Conv1D, weight (in, out), the transpose of nn.Linear's (out, in).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from gpt2lab.atomic import atomic_write, read_json, write_json
from gpt2lab.checkpoint import copy_weights, load_model, model_tensors, save_checkpoint
from gpt2lab.config import GPTConfig
from gpt2lab.errors import UserError
from gpt2lab.model import GPT

HUB_NAMES = {  # OpenAI's four GPT-2 sizes on the Hugging Face hub
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers older files carry; not weights
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")  # transformers' names for GPT-2's tanh-approximated GELU
EXACT_GELU = ("gelu",)  # transformers' name for the exact (erf) GELU


def config_from_hf(hf: dict[str, Any], source: str, **overrides: Any) -> GPTConfig:
    """GPTConfig for a transformers GPT2Config dict; anything we would compute differently is an error."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{source}: model_type is {hf.get('model_type')!r}, not 'gpt2'")
    act = hf.get("activation_function", "gelu_new")
    if act not in TANH_GELU + EXACT_GELU:
        raise UserError(f"{source}: activation_function {act!r} is not a GELU {TANH_GELU + EXACT_GELU}")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        raise UserError(f"{source}: attention scaling differs from GPT-2's 1/sqrt(head_size)")
    try:
        fields = dict(
            block_size=hf["n_positions"],
            vocab_size=hf["vocab_size"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
        )
    except KeyError as e:
        raise UserError(f"{source}: config.json has no {e.args[0]!r}") from None
    fields.update(
        n_inner=hf.get("n_inner"),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        tie_weights=hf.get("tie_word_embeddings", True),
        activation="gelu" if act in EXACT_GELU else "gelu_tanh",
        dropout=0.0,  # a loaded model is for evaluation or fine-tuning; ask for dropout explicitly
    )
    return GPTConfig.from_dict({**fields, **overrides})


def config_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    """The transformers GPT2Config dict for an exportable GPTConfig."""
    hf: dict[str, Any] = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.n_inner,
        "activation_function": "gelu" if cfg.activation == "gelu" else "gelu_new",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "initializer_range": cfg.init_std,
        "scale_attn_weights": True,
        "tie_word_embeddings": cfg.tie_weights,
        "use_cache": True,
    }
    if cfg.vocab_size > 50256:  # GPT-2's <|endoftext|> is id 50256, both its BOS and EOS
        hf.update(bos_token_id=50256, eos_token_id=50256)
    return hf


def resolve(name_or_dir: str | Path) -> Path:
    """A local directory as given, or a hub name ("gpt2", ...) downloaded (once) into the HF cache."""
    path = Path(name_or_dir)
    if path.is_dir():
        return path
    name = str(name_or_dir)
    if name not in HUB_NAMES:
        raise UserError(f"{name!r} is neither a directory nor one of the hub models {list(HUB_NAMES)}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(
            f"downloading {name!r} needs huggingface_hub: pip install 'gpt2lab[hf]', "
            "or pass a local directory with config.json and model.safetensors"
        ) from None
    from gpt2lab.download import HUB_REVISIONS, verify_hub_files

    repo, files = HUB_NAMES[name], ["config.json", "model.safetensors"]
    try:  # a pinned commit: the same files every time, whatever the repository's main branch becomes
        path = Path(snapshot_download(repo, revision=HUB_REVISIONS[repo], allow_patterns=files))
    except Exception as e:  # offline, proxy, disk: the hub client raises many types
        raise UserError(
            f"could not download {name!r} from the Hugging Face hub ({type(e).__name__}); when offline, "
            "copy its config.json and model.safetensors into a directory and pass that directory"
        ) from None
    return verify_hub_files(repo, path, files)


def read_hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face model directory: safetensors (single or sharded) or pytorch_model.bin."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if (path / "model.safetensors").is_file():
            return load_file(path / "model.safetensors")
        index = path / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in load_file(path / shard).items()}
        if (path / "pytorch_model.bin").is_file():
            # weights_only=True: a pickle from the internet must not be able to run code.
            return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, KeyError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: the weights cannot be read ({type(e).__name__}: {e})") from None
    raise UserError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def load_pretrained(name_or_dir: str | Path, **overrides: Any) -> GPT:
    """A GPT with the weights of a Hugging Face GPT-2 directory or hub name, in eval mode."""
    path = resolve(name_or_dir)
    hf_config = read_json(
        path / "config.json", f"{path}: no config.json (expected a Hugging Face GPT-2 directory)"
    )
    model = GPT(config_from_hf(hf_config, str(path), **overrides))
    tensors = {}
    for name, t in read_hf_tensors(path).items():
        if name.endswith(MASK_BUFFERS):
            continue
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name  # GPT2Model files: the hub's own gpt2 weights are stored this way
        tensors[name] = t.t() if name.endswith(CONV1D) else t
    copy_weights(model, tensors, str(path))
    return model.eval()


def save_pretrained(model: GPT, out_dir: str | Path) -> None:
    """Write config.json + model.safetensors that transformers.GPT2LMHeadModel loads to the same function.

    Other files in out_dir (a tokenizer, say) are kept; each written file is replaced atomically.
    """
    from safetensors.torch import save_file

    cfg = model.config
    if cfg.norm_position != "pre":
        raise UserError(
            "cannot export to Hugging Face GPT-2: it has only pre-LayerNorm blocks (norm_position)"
        )
    if cfg.pos_embedding != "learned":
        raise UserError("cannot export to Hugging Face GPT-2: it has only learned position embeddings")
    # The speedrun options change the function in ways GPT2LMHeadModel has no setting for.
    unheld = [f"{f}={getattr(cfg, f)!r}" for f in ("qk_norm", "logit_softcap") if getattr(cfg, f)]
    unheld += [f"activation={cfg.activation!r}"] if cfg.activation not in ("gelu", "gelu_tanh") else []
    if unheld:
        raise UserError(f"cannot export to Hugging Face GPT-2: it has no {', '.join(unheld)}")
    tensors = model_tensors(model)
    if not cfg.bias:  # GPT-2 always has biases; zeros compute exactly the function of no bias
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)) and name != "lm_head":
                width = module.weight.shape[0]
                tensors[f"{name}.bias"] = torch.zeros(width, dtype=module.weight.dtype)
    tensors = {k: v.t().contiguous() if k.endswith(CONV1D) else v for k, v in tensors.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    write_json(out_dir / "config.json", config_to_hf(cfg))


def convert(out: str | Path, ckpt: str | Path | None = None, pretrained: str | Path | None = None) -> str:
    """Hugging Face -> gpt2lab checkpoint (pretrained=...) or gpt2lab checkpoint -> Hugging Face (ckpt=...).

    The written files are read back and run on a fixed input; returns a one-line report with the
    largest logit difference between the source model and the reloaded one.
    """
    if (ckpt is None) == (pretrained is None):
        raise UserError(
            "convert needs exactly one of --ckpt DIR (to Hugging Face) or --pretrained NAME_OR_DIR"
        )
    if ckpt is not None:
        model = load_model(ckpt)
        save_pretrained(model, out)
        reloaded, what = load_pretrained(out), "Hugging Face GPT-2 directory"
    else:
        model = load_pretrained(pretrained)
        save_checkpoint(out, model, extra={"source": str(pretrained)})
        reloaded, what = load_model(out), "gpt2lab checkpoint"
    idx = torch.randint(
        0,
        model.config.vocab_size,
        (1, min(64, model.config.block_size)),
        generator=torch.Generator().manual_seed(0),
    )
    with torch.no_grad():
        diff = (model(idx) - reloaded(idx)).abs().max().item()
    if diff != 0.0:
        raise RuntimeError(f"conversion check failed: reloaded model differs by {diff:g} in logits")
    params = model.num_params()
    return f"wrote {what} {out} ({params:,} parameters); reloaded logits identical (max |diff| = 0)"
