"""The LM's tokenizer for an imported run: ``tokenizer.json`` plus the modality tags as added special tokens, the
other tokenizer files, the chat template, and ``mimo_special_tokens.json`` naming which ids play ``<bos>``,
``<eos>``, ``<pad>``, ``<video>``, ``<audio>`` and ``<image>``.

    info = prepare_tokenizer(HFDir("vicuna"), Path("run/tokenizer"))
    info.vocab_size, info.special_tokens["<video>"], info.chat_template
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mimo_ray.convert.hf_dir import HFDir
from mimo_ray.data.tokenizer import MODALITY_TAGS, SPECIAL_NAMES_FILE

COPIED = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "generation_config.json",
          "chat_template.jinja", "chat_template.json")
# A template in the ChatTokenizer's own syntax for LMs whose tokenizer has none (Vicuna v1.5 style).
FALLBACK_TEMPLATE = "<bos>USER: {human} ASSISTANT: {answer}<eos>"
TEMPLATE_FILE = "chat_template.jinja"


@dataclass
class TokenizerInfo:
    """What the import derives from the tokenizer.

    Attributes:
        tokenizer_json: path of the written ``tokenizer.json``.
        vocab_size: ids in use (the HF ids plus the added tags).
        special_tokens: ``{"<bos>" | "<eos>" | "<pad>" | "<video>" | …: id}``.
        chat_template: path of the template file (Jinja from the LM, or the fallback template).
        added: the tags this import added to the vocabulary.
    """

    tokenizer_json: Path
    vocab_size: int
    special_tokens: dict[str, int]
    chat_template: Path
    added: list[str]


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _special_id(tok: Any, name: str, tok_cfg: dict[str, Any], model_cfg: dict[str, Any]) -> int | None:
    text = _token_text(tok_cfg.get(f"{name}_token"))
    if text is not None and tok.token_to_id(text) is not None:
        return int(tok.token_to_id(text))
    value = model_cfg.get(f"{name}_token_id")
    if isinstance(value, list):
        value = value[0] if value else None
    return int(value) if value is not None else None


def prepare_tokenizer(src: HFDir, out: Path) -> TokenizerInfo:
    """Write the run's tokenizer directory from the LM's.

    Args:
        src: the LM directory.
        out: the run's ``tokenizer/`` directory (created).

    Returns:
        The :class:`TokenizerInfo`.

    Raises:
        ValueError: the LM directory has no ``tokenizer.json``, or no end-of-sequence token.
    """
    from tokenizers import AddedToken, Tokenizer

    tj = src.path / "tokenizer.json"
    if not tj.is_file():
        raise ValueError(
            f"--lm {str(src.path)!r} has no tokenizer.json (a fast tokenizer); write one with transformers: "
            f"AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)"
        )
    out.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if (src.path / name).is_file():
            shutil.copyfile(src.path / name, out / name)
    tok = Tokenizer.from_file(str(tj))
    tok_cfg_file = src.path / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_file.read_text()) if tok_cfg_file.is_file() else {}
    added = [tag for tag in MODALITY_TAGS.values() if tok.token_to_id(tag) is None]
    if added:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    tok.save(str(out / "tokenizer.json"))
    special = {tag: int(tok.token_to_id(tag)) for tag in MODALITY_TAGS.values()}
    eos = _special_id(tok, "eos", tok_cfg, src.config)
    if eos is None:
        raise ValueError(f"--lm {str(src.path)!r}: no eos_token in tokenizer_config.json nor eos_token_id in config")
    bos = _special_id(tok, "bos", tok_cfg, src.config)
    pad = _special_id(tok, "pad", tok_cfg, src.config)
    special["<eos>"] = eos
    special["<pad>"] = pad if pad is not None else eos
    if bos is not None:
        special["<bos>"] = bos
    if added and tok_cfg_file.is_file() and isinstance(tok_cfg.get("added_tokens_decoder"), dict):
        for tag in added:
            tok_cfg["added_tokens_decoder"][str(special[tag])] = {
                "content": tag, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                "special": True,
            }
        (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: use "default"
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not template and (src.path / TEMPLATE_FILE).is_file():
        template = (src.path / TEMPLATE_FILE).read_text()
    template_file = out / TEMPLATE_FILE if template else out / "chat_template.mimo.txt"
    template_file.write_text(template or (FALLBACK_TEMPLATE if bos is not None else FALLBACK_TEMPLATE[5:]))
    (out / SPECIAL_NAMES_FILE).write_text(json.dumps(special, indent=1, sort_keys=True))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    return TokenizerInfo(out / "tokenizer.json", vocab, special, template_file, added)
