"""gpt2lab tokenizers in Hugging Face's files, and back.

Written: tokenizer.json (the `tokenizers` library's format: what AutoTokenizer's fast tokenizers,
vLLM and llama.cpp's converter read), vocab.json + merges.txt (BPE), tokenizer_config.json
(special tokens, model_max_length, the chat template) and special_tokens_map.json.

Each gpt2lab tokenizer has an exact equivalent there (tests/test_interop_tokenizer.py holds them to
identical ids on every text of ../shared/data):
  BPE (GPT-2's, or one `gpt2lab tokenizer train` made): byte-level BPE, GPT-2's pre-tokenization regex,
      the merges in rank order.
  bytes: byte-level, no regex, no merges: one token per UTF-8 byte, id = the byte's value.
  char: WordLevel over single characters, each character cut out by a Split pre-tokenizer; a
      character outside the alphabet is an error there as here, never a silent <unk>.
Special tokens (<|endoftext|>, the chat template's <|user|> ...) are added tokens with special=True,
which transformers matches in text: the same ids as gpt2lab's encode(text, allowed_special="all").
A fine-tuned model's chat_template (Jinja) renders exactly what sft.render_chat renders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gpt2lab.atomic import read_json
from gpt2lab.bpe import EOT, PATTERNS, bytes_to_unicode, gpt2_format_bpe, pattern_name
from gpt2lab.errors import UserError
from gpt2lab.tokenizer import (
    GPT2_EOT_ID,
    GPT2_VOCAB_SIZE,
    AddedTokens,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    _gpt2_pair,
    gpt2_tokenizer,
)

CHAR_SPLIT = r"[\s\S]"  # one character (Oniguruma, which `tokenizers` uses, has no DOTALL default)
UNK = "<unk>"  # WordLevel's unk_token, deliberately not in the vocabulary: an unknown character fails


def chat_template() -> str:
    """sft.render_chat as Jinja: EOT, then <|role|>content<|end|> per message, then <|assistant|>."""
    from gpt2lab import sft

    roles = " or ".join(repr(r) for r in sft.ROLES)
    return (
        "{{ '" + EOT + "' }}"
        "{% for message in messages %}"
        "{% if message['role'] not in " + json.dumps(list(sft.ROLES)) + " %}"
        "{{ raise_exception('role must be " + roles.replace("'", "") + ", got ' + message['role']) }}"
        "{% endif %}"
        "{{ '<|' + message['role'] + '|>' + message['content'] + '" + sft.END + "' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '" + sft.ASSISTANT + "' }}{% endif %}"
    )


def _split(tok: Tokenizer) -> tuple[Tokenizer, dict[str, int]]:
    """(base tokenizer, {added token: id}): fine-tuning's added tokens apart from the vocabulary."""
    if isinstance(tok, AddedTokens):
        return tok.base, dict(tok.added)
    return tok, {}


def tokenizer_json(tok: Tokenizer) -> dict[str, Any]:
    """The `tokenizers` library's JSON for a gpt2lab tokenizer; UserError when none can be exact.

    The base vocabulary's special tokens (<|endoftext|>) are in the model's vocab, as GPT-2's is;
    fine-tuning's added tokens are added tokens only, with their ids, as transformers adds tokens.
    """
    base, _ = _split(tok)
    specials = dict(sorted(tok.special_tokens.items(), key=lambda x: x[1]))
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if isinstance(base, BPETokenizer):
        bpe = base.bpe
        if pattern_name(bpe.pattern) == "gpt2":
            pre: dict[str, Any] = byte_level  # GPT-2's regex is ByteLevel's built-in one
        else:
            pre = {
                "type": "Sequence",
                "pretokenizers": [
                    {
                        "type": "Split",
                        "pattern": {"Regex": bpe.pattern},
                        "behavior": "Isolated",
                        "invert": False,
                    },
                    {**byte_level, "use_regex": False},
                ],
            }
        model = _bpe_model(bpe.gpt2_encoder(), [f"{a} {b}" for a, b in bpe.gpt2_merges()])
        decoder: dict[str, Any] = byte_level
    elif isinstance(base, ByteTokenizer):
        table = bytes_to_unicode()
        vocab = {**{table[b]: b for b in range(256)}, **base.special_tokens}
        pre, model, decoder = {**byte_level, "use_regex": False}, _bpe_model(vocab, []), byte_level
    elif isinstance(base, CharTokenizer):
        if UNK in base.stoi or UNK in base.special_tokens:
            raise UserError(
                f"char tokenizer {tok.name!r} has {UNK!r} in its alphabet; no exact tokenizer.json"
            )
        pre = {"type": "Split", "pattern": {"Regex": CHAR_SPLIT}, "behavior": "Isolated", "invert": False}
        model = {"type": "WordLevel", "vocab": {**base.stoi, **base.special_tokens}, "unk_token": UNK}
        decoder = {"type": "Fuse"}
    else:
        raise UserError(f"tokenizer {tok.name!r} ({type(base).__name__}) has no Hugging Face equivalent")
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for t, i in specials.items()
    ]  # fmt: skip
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre,
        "post_processor": None,
        "decoder": decoder,
        "model": model,
    }


def _bpe_model(vocab: dict[str, int], merges: list[str]) -> dict[str, Any]:
    return {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": "",
        "end_of_word_suffix": "",
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": False,
        "vocab": vocab,
        "merges": merges,
    }


def tokenizer_files(tok: Tokenizer, model_max_length: int) -> dict[str, str]:
    """{file name: text} of the tokenizer files of a Hugging Face model folder."""
    from gpt2lab import sft

    base, added = _split(tok)
    doc = tokenizer_json(tok)
    eot = EOT if EOT in tok.special_tokens else None
    if eot is None:
        raise UserError(f"tokenizer {tok.name!r} has no {EOT} token to end generation with")
    config: dict[str, Any] = {
        # GPT2Tokenizer for BPE (it also reads vocab.json + merges.txt); the generic fast tokenizer
        # (tokenizer.json alone) for characters and bytes.
        "tokenizer_class": "GPT2Tokenizer" if isinstance(base, BPETokenizer) else "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "bos_token": eot,
        "eos_token": eot,
        "unk_token": eot,
        "pad_token": eot,  # fine-tuning pads with it (sft.collate); transformers needs one to batch
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # decode gives the exact text, as gpt2lab's decode
        "errors": "replace",
        "added_tokens_decoder": {
            str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in doc["added_tokens"]
        },
    }
    chat = all(t in tok.special_tokens for t in sft.TEMPLATE_TOKENS)
    if chat:
        config["chat_template"] = chat_template()
    extra = [t for t in tok.special_tokens if t != eot]
    special_map: dict[str, Any] = {k: eot for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    if extra:
        special_map["additional_special_tokens"] = extra
        config["additional_special_tokens"] = extra
    files = {
        "tokenizer.json": json.dumps(doc, ensure_ascii=False),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        "special_tokens_map.json": json.dumps(special_map, indent=2, ensure_ascii=False) + "\n",
    }
    if isinstance(base, BPETokenizer):
        files["vocab.json"] = json.dumps(doc["model"]["vocab"], ensure_ascii=False)
        files["merges.txt"] = "#version: 0.2\n" + "".join(m + "\n" for m in doc["model"]["merges"])
    return files


# --- reading ---------------------------------------------------------------------------------------


def read_hf_tokenizer(d: Path) -> Tokenizer | None:
    """The tokenizer of a Hugging Face folder: from tokenizer.json, else vocab.json + merges.txt.

    None when the folder has neither (the caller falls back to GPT-2's vocabulary). Added tokens
    beyond the model's vocabulary (a fine-tuned model's chat template) come back as AddedTokens.
    A tokenizer gpt2lab cannot reproduce exactly (another model type, a normalizer, another
    pre-tokenizer) is a UserError, never a silently different tokenizer.
    """
    path = d / "tokenizer.json"
    if path.is_file():
        doc = read_json(path, f"{path} does not exist")
        if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
            raise UserError(f"{path}: no 'model' object; not a tokenizers JSON file")
        added = {a["content"]: a["id"] for a in doc.get("added_tokens", []) if isinstance(a, dict)}
        base = _from_tokenizer_json(doc, path, d, added)
    elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        from gpt2lab.bpe import load_gpt2_files

        config = d / "tokenizer_config.json"
        decoder = read_json(config, "").get("added_tokens_decoder", {}) if config.is_file() else {}
        added = {v["content"]: int(k) for k, v in decoder.items() if isinstance(v, dict)}
        base = _bpe_tokenizer(load_gpt2_files(d / "vocab.json", d / "merges.txt"), d)
    else:
        return None
    extra = {t: i for t, i in added.items() if t not in base.special_tokens and i >= base.vocab_size}
    return AddedTokens(base, extra) if extra else base


def _bpe_tokenizer(bpe: Any, d: Path) -> Tokenizer:
    """GPT-2's own vocabulary (kind "gpt2", found again from the folder's files), or another BPE."""
    if bpe.vocab_size == GPT2_VOCAB_SIZE and bpe.special_tokens == {EOT: GPT2_EOT_ID} and _gpt2_pair(d):
        return gpt2_tokenizer(d)
    return BPETokenizer(bpe, d.resolve().name)


def _from_tokenizer_json(doc: dict[str, Any], path: Path, d: Path, added: dict[str, int]) -> Tokenizer:
    """The base tokenizer of a tokenizer.json (its model's vocabulary and the specials in it)."""
    model, pre = doc["model"], doc.get("pre_tokenizer")
    if doc.get("normalizer") not in (None, {}):
        raise UserError(f"{path}: a normalizer ({doc['normalizer'].get('type')}) gpt2lab does not reproduce")
    vocab = model.get("vocab", {})
    if not isinstance(vocab, dict):
        raise UserError(f"{path}: model.vocab is not an object of token -> id")
    specials = {t: i for t, i in added.items() if t in vocab}
    kind = model.get("type")
    if kind == "WordLevel" and _is_split(pre, CHAR_SPLIT):
        chars = [t for t, _ in sorted(vocab.items(), key=lambda x: x[1]) if t not in specials]
        if [vocab[c] for c in chars] != list(range(len(chars))) or any(len(c) != 1 for c in chars):
            raise UserError(f"{path}: a WordLevel vocabulary that is not one id per character, then specials")
        tok: Tokenizer = CharTokenizer(chars, [t for t, _ in sorted(specials.items(), key=lambda x: x[1])])
        if tok.special_tokens != specials:
            raise UserError(f"{path}: special token ids {specials} do not follow the {len(chars)} characters")
        return tok
    if kind != "BPE":
        raise UserError(f"{path}: model type {kind!r}; gpt2lab reads byte-level BPE and character tokenizers")
    if model.get("ignore_merges") or model.get("byte_fallback") or model.get("continuing_subword_prefix"):
        raise UserError(f"{path}: BPE options (ignore_merges, byte_fallback, prefixes) gpt2lab does not use")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    table = bytes_to_unicode()
    if not merges and _is_byte_level(pre, regex=False) and all(vocab.get(table[b]) == b for b in range(256)):
        tok = ByteTokenizer([t for t, _ in sorted(specials.items(), key=lambda x: x[1])])
        if tok.special_tokens != specials or len(vocab) != 256 + len(specials):
            raise UserError(f"{path}: special token ids {specials} do not follow the 256 bytes")
        return tok
    if _is_byte_level(pre, regex=True):
        pattern = PATTERNS["gpt2"]
    elif (
        isinstance(pre, dict)
        and pre.get("type") == "Sequence"
        and len(pre.get("pretokenizers", [])) == 2
        and _is_byte_level(pre["pretokenizers"][1], regex=False)
        and _is_split(pre["pretokenizers"][0], None)
    ):
        pattern = pre["pretokenizers"][0]["pattern"]["Regex"]
    else:
        raise UserError(f"{path}: pre-tokenizer {json.dumps(pre)[:80]} is not GPT-2's byte-level one")
    return _bpe_tokenizer(gpt2_format_bpe(vocab, merges, str(path), pattern=pattern), d)


def _is_byte_level(pre: Any, regex: bool) -> bool:
    return (
        isinstance(pre, dict)
        and pre.get("type") == "ByteLevel"
        and not pre.get("add_prefix_space", False)
        and bool(pre.get("use_regex", True)) == regex
    )


def _is_split(pre: Any, pattern: str | None) -> bool:
    if not (isinstance(pre, dict) and pre.get("type") == "Split" and not pre.get("invert", False)):
        return False
    regex = (pre.get("pattern") or {}).get("Regex")
    return pre.get("behavior") == "Isolated" and regex is not None and (pattern is None or regex == pattern)
