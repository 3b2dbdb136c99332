"""Text → token ids for MIMO training and inference: a byte-level tokenizer (or any Hugging Face ``tokenizer.json``),
a chat template, and placeholder expansion of modality tags.

    tok = ChatTokenizer.from_config(cfg)               # data.tokenizer: "byte" or a path to tokenizer.json
    enc = tok.encode(row["conversations"])              # LLaVA turns [{"from": "human"|"gpt", "value": ...}, ...]
    ids, labels, loss_mask = tok.pad(enc)               # [S] each, S = model.lm.seq_length
    prompt = tok.encode_prompt(row["conversations"])    # ends right after <|assistant|> (inference)
    tok2 = ChatTokenizer.from_dict(tok.to_dict())       # saved into checkpoints

Every turn is rendered with the chat template (default ``<bos><|user|>{human}<|assistant|>{answer}<eos>``). A
``<video>``/``<audio>``/``<image>`` tag in a human turn becomes exactly ``tokens_per_sample(cfg, modality)`` copies of
that modality's special token id (C2). The answer and the template tokens after it (``<eos>``) are the trained
targets; labels are next-token targets (``labels[t] = input_ids[t+1]`` where that token is a target, else -100).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mimo_ray.config import MODALITY_TAGS, SPECIAL_TOKENS

TAG_MODALITIES: dict[str, str] = {tag: mod for mod, tag in MODALITY_TAGS.items()}
DEFAULT_CHAT_TEMPLATE = "<bos><|user|>{human}<|assistant|>{answer}<eos>"
#: ``data.chat_template`` value for raw text: the prompt is the human text as the tokenizer encodes it alone.
RAW_TEMPLATE = "none"
#: Beside a ``tokenizer.json``: which of its ids play ``<bos>``, ``<eos>``, ``<pad>``, ``<video>``… (written by import).
SPECIAL_NAMES_FILE = "mimo_special_tokens.json"
IGNORE_INDEX = -100
FORMAT = "mimo_ray.chat_tokenizer/v1"

_TAG_RE = re.compile("|".join(re.escape(t) for t in MODALITY_TAGS.values()))
_TEMPLATE_RE = re.compile(r"(\{human\}|\{answer\}|<\|[a-z_]+\|>|<[a-z_]+>)")
_HUMAN_ROLES = ("human", "user")
_ANSWER_ROLES = ("gpt", "assistant")


class TokenizeError(ValueError):
    """A conversation that cannot be encoded; ``stage`` is ``"tags"``, ``"text"`` or ``"manifest"``."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.stage, self.message))


# ---------------------------------------------------------------- text tokenizers


class ByteTokenizer:
    """UTF-8 bytes are ids 0…255; :data:`SPECIAL_TOKENS` follow."""

    kind = "byte"

    def __init__(self) -> None:
        self.special_tokens = dict(SPECIAL_TOKENS)

    @property
    def vocab_size(self) -> int:
        return max(self.special_tokens.values()) + 1

    def encode_text(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Bytes back to text; special tokens are dropped, invalid UTF-8 is replaced."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}


class HFTokenizer:
    """A Hugging Face ``tokenizers`` model from a ``tokenizer.json``; specials it lacks get ids after its vocab."""

    kind = "hf"

    def __init__(self, tokenizer_json: str, special_tokens: dict[str, int] | None = None) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as err:  # pragma: no cover - a declared dependency
            raise ImportError("data.tokenizer=<path to tokenizer.json> needs the 'tokenizers' package") from err
        self.tokenizer_json = tokenizer_json
        self._tok = Tokenizer.from_str(tokenizer_json)
        if special_tokens is None:
            special_tokens = {}
            next_id = self._tok.get_vocab_size(with_added_tokens=True)
            for name in SPECIAL_TOKENS:
                found = self._tok.token_to_id(name)
                if found is None:
                    found, next_id = next_id, next_id + 1
                special_tokens[name] = int(found)
        self.special_tokens = dict(special_tokens)
        self._special_ids = set(self.special_tokens.values())

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        """Read a ``tokenizer.json``; a sibling :data:`SPECIAL_NAMES_FILE` fixes the special-token ids."""
        import json

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"data.tokenizer={str(path)!r}: no such tokenizer.json file")
        names = path.parent / SPECIAL_NAMES_FILE
        special = {k: int(v) for k, v in json.loads(names.read_text()).items()} if names.is_file() else None
        return cls(path.read_text(encoding="utf-8"), special)

    @property
    def vocab_size(self) -> int:
        return max(self._tok.get_vocab_size(with_added_tokens=True), max(self.special_tokens.values()) + 1)

    def encode_text(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids) if text else []

    def encode_with_offsets(self, text: str, add_special_tokens: bool = False) -> tuple[list[int], list[int]]:
        """Ids of ``text`` (added tokens matched, as transformers does) and each token's first character offset."""
        enc = self._tok.encode(text, add_special_tokens=add_special_tokens)
        return list(enc.ids), [start for start, _ in enc.offsets]

    def decode(self, ids: list[int]) -> str:
        base = self._tok.get_vocab_size(with_added_tokens=True)
        return self._tok.decode([i for i in ids if i not in self._special_ids and 0 <= i < base])

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "tokenizer_json": self.tokenizer_json, "special_tokens": self.special_tokens}


def text_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """``"byte"`` or a path to a Hugging Face ``tokenizer.json`` (the value of ``data.tokenizer``)."""
    return ByteTokenizer() if spec == "byte" else HFTokenizer.from_file(spec)


def _text_tokenizer_from_dict(data: dict[str, Any]) -> ByteTokenizer | HFTokenizer:
    if data["kind"] == "byte":
        return ByteTokenizer()
    if data["kind"] == "hf":
        return HFTokenizer(data["tokenizer_json"], {k: int(v) for k, v in data["special_tokens"].items()})
    raise ValueError(f"unknown tokenizer kind {data['kind']!r}; known: byte, hf")


# ---------------------------------------------------------------- chat encoding


@dataclass
class Encoded:
    """One encoded conversation, unpadded.

    Attributes:
        ids: int64 ``[L]`` token ids.
        target: bool ``[L]``: the token is a trained target (answer tokens and the template tokens after them).
        prompt_len: tokens up to and including the last ``<|assistant|>`` (prompt encodings), else ``L``.
        answer: the reference answer text of a prompt encoding (``None`` when the conversation has none).
    """

    ids: np.ndarray
    target: np.ndarray
    prompt_len: int
    answer: str | None = None


def conversation_turns(conversations: Any, *, allow_open: bool) -> list[tuple[str, str | None]]:
    """LLaVA ``[{"from": "human", "value": …}, {"from": "gpt", "value": …}, …]`` → ``[(human, answer), …]``.

    Args:
        conversations: the row's list (``from`` may also be ``user``/``assistant``).
        allow_open: the last turn may be a human message without an answer (prompt encodings).

    Raises:
        TokenizeError: stage ``manifest`` when the list is malformed or roles do not alternate human → gpt.
    """
    if not isinstance(conversations, list) or not conversations:
        raise TokenizeError("manifest", f"'conversations' must be a non-empty list, got {conversations!r:.80}")
    turns: list[tuple[str, str | None]] = []
    for i, msg in enumerate(conversations):
        if not isinstance(msg, dict) or not isinstance(msg.get("value"), str):
            raise TokenizeError(
                "manifest", f"conversations[{i}] must be {{'from': ..., 'value': str}}, got {msg!r:.80}"
            )
        role = msg.get("from")
        want = _HUMAN_ROLES if i % 2 == 0 else _ANSWER_ROLES
        if role not in want:
            raise TokenizeError(
                "manifest", f"conversations[{i}].from={role!r}; turns must alternate human, gpt, human, ..."
            )
        if i % 2 == 0:
            turns.append((msg["value"], None))
        else:
            turns[-1] = (turns[-1][0], msg["value"])
    if turns[-1][1] is None and not allow_open:
        raise TokenizeError("manifest", "the last human turn has no gpt answer to train on")
    return turns


def count_tags(conversations: list[dict[str, Any]], user_tags: dict[str, str] | None = None) -> dict[str, int]:
    """How often each modality tag occurs in the human turns: ``{"video": 1, "audio": 1, "images": 0}`` (plus the
    user modalities of ``user_tags`` ``{modality: tag}``).
    """
    tags = {**TAG_MODALITIES, **{t: m for m, t in (user_tags or {}).items()}}
    pattern = re.compile("|".join(re.escape(t) for t in tags))
    counts = dict.fromkeys(tags.values(), 0)
    for i, msg in enumerate(conversations):
        if i % 2 == 0 and isinstance(msg, dict) and isinstance(msg.get("value"), str):
            for tag in pattern.findall(msg["value"]):
                counts[tags[tag]] += 1
    return counts


class ChatTokenizer:
    """Chat template + placeholder expansion over a byte or Hugging Face text tokenizer.

    Args:
        text: the text tokenizer.
        placeholders: ``{modality: (special token id, tokens per sample)}`` for the model's input modalities.
        seq_length: the LM's sequence length; longer encodings raise ``TokenizeError("text")``.
        chat_template: per-turn template with ``{human}`` and ``{answer}`` and special-token names.
        tags: ``{modality: tag}`` of user modalities (``<depth>``); ours are ``<video>``, ``<audio>``, ``<image>``.
            A user tag in a human turn expands to its placeholders without being a token of the text tokenizer.

    Raises:
        ValueError: a malformed template, or a special-token name the tokenizer does not have.
    """

    def __init__(
        self,
        text: ByteTokenizer | HFTokenizer,
        placeholders: dict[str, tuple[int, int]],
        seq_length: int,
        chat_template: str = DEFAULT_CHAT_TEMPLATE,
        tags: dict[str, str] | None = None,
    ) -> None:
        self.text = text
        self.placeholders = {m: (int(t), int(n)) for m, (t, n) in placeholders.items()}
        self.user_tags = {m: t for m, t in (tags or {}).items() if m not in MODALITY_TAGS}
        self._tag_modalities = {**TAG_MODALITIES, **{t: m for m, t in self.user_tags.items()}}
        self._tag_re = re.compile("|".join(re.escape(t) for t in self._tag_modalities))
        self.seq_length = int(seq_length)
        self.chat_template = chat_template
        self.pad_id = text.special_tokens["<pad>"]
        self.eos_id = text.special_tokens["<eos>"]
        self.mode = template_mode(chat_template)
        self._segments = self._parse_template(chat_template) if self.mode == "simple" else []
        self._jinja = self._compile_jinja(chat_template) if self.mode == "jinja" else None

    # ----- construction / persistence
    @classmethod
    def from_config(cls, cfg: Any) -> ChatTokenizer:
        """From ``data.tokenizer`` and the model's modalities, token ids, counts and ``seq_length``.

        Raises:
            ValueError: naming ``model.special_token_ids.<modality>`` when it disagrees with the tokenizer's tag id,
                or ``model.lm.vocab_size`` when it cannot hold the tokenizer's ids.
        """
        from mimo_ray.model.spec import tokens_per_sample

        text = text_tokenizer(cfg.data.tokenizer)
        placeholders = {}
        tags = {}
        for mod in cfg.model.modalities:
            if mod not in MODALITY_TAGS:  # a user modality: its tag expands in the human text, its id is the config's
                have = cfg.model.special_token_ids[mod]
                if have < text.vocab_size:
                    raise ValueError(
                        f"model.special_token_ids.{mod}={have} is an id of tokenizer {cfg.data.tokenizer!r} (it uses "
                        f"0..{text.vocab_size - 1}); give the user modality an id in [{text.vocab_size}, "
                        f"model.lm.vocab_size={cfg.model.lm.vocab_size})"
                    )
                placeholders[mod] = (have, tokens_per_sample(cfg, mod)) if mod in cfg.model.modality_tokens else (
                    have, 0)
                tags[mod] = cfg.model.tag(mod)
                continue
            want = text.special_tokens[MODALITY_TAGS[mod]]
            have = cfg.model.special_token_ids[mod]
            if have != want:
                raise ValueError(
                    f"model.special_token_ids.{mod}={have} but tokenizer {cfg.data.tokenizer!r} has id {want} for "
                    f"{MODALITY_TAGS[mod]}; set model.special_token_ids.{mod}={want}"
                )
            placeholders[mod] = (have, tokens_per_sample(cfg, mod))
        if text.vocab_size > cfg.model.lm.vocab_size:
            raise ValueError(
                f"model.lm.vocab_size={cfg.model.lm.vocab_size} is smaller than the {text.vocab_size} ids of "
                f"tokenizer {cfg.data.tokenizer!r}"
            )
        return cls(text, placeholders, cfg.model.lm.seq_length, resolve_template(cfg.data.chat_template), tags)

    def with_template(self, chat_template: str | None) -> ChatTokenizer:
        """The same tokenizer with another template (a ``data.chat_template`` value: text, file, ``none``)."""
        return ChatTokenizer(self.text, self.placeholders, self.seq_length, resolve_template(chat_template),
                             self.user_tags)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state: text tokenizer, chat template, special-token ids, placeholder counts, seq_length."""
        return {
            "format": FORMAT,
            "text_tokenizer": self.text.to_dict(),
            "special_tokens": dict(self.text.special_tokens),
            "chat_template": self.chat_template,
            "placeholders": {m: list(v) for m, v in self.placeholders.items()},
            "seq_length": self.seq_length,
            "tags": dict(self.user_tags),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChatTokenizer:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a saved ChatTokenizer (format={data.get('format')!r}, expected {FORMAT!r})")
        placeholders = {m: (int(v[0]), int(v[1])) for m, v in data["placeholders"].items()}
        text = _text_tokenizer_from_dict(data["text_tokenizer"])
        return cls(text, placeholders, int(data["seq_length"]), data["chat_template"], data.get("tags") or {})

    def _parse_template(self, template: str) -> list[tuple[str, Any]]:
        """Template → ``[("special", id) | ("text", str) | ("human", None) | ("answer", None)]``."""
        if template.count("{human}") != 1 or template.count("{answer}") != 1:
            raise ValueError(f"chat template {template!r} must contain {{human}} and {{answer}} exactly once")
        if template.index("{human}") > template.index("{answer}"):
            raise ValueError(f"chat template {template!r}: {{human}} must come before {{answer}}")
        segments: list[tuple[str, Any]] = []
        for part in _TEMPLATE_RE.split(template):
            if not part:
                continue
            if part in ("{human}", "{answer}"):
                segments.append((part[1:-1], None))
            elif _TEMPLATE_RE.fullmatch(part):
                if part not in self.text.special_tokens:
                    raise ValueError(f"chat template {template!r} names unknown special token {part!r}")
                segments.append(("special", self.text.special_tokens[part]))
            else:
                segments.append(("text", part))
        return segments

    # ----- Jinja (Hugging Face) templates and raw text
    def _compile_jinja(self, template: str) -> Any:
        import json

        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if not isinstance(self.text, HFTokenizer):
            raise ValueError("a Jinja chat template needs a Hugging Face tokenizer (data.tokenizer=<tokenizer.json>)")

        def raise_exception(message: str) -> None:
            raise TokenizeError("manifest", f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(template)

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        names = {}
        for name, key in (("<bos>", "bos_token"), ("<eos>", "eos_token"), ("<pad>", "pad_token")):
            if name in self.text.special_tokens:
                names[key] = self.text._tok.id_to_token(self.text.special_tokens[name])
        return self._jinja.render(messages=messages, add_generation_prompt=add_generation_prompt, **names)

    def _expand_tags(self, ids: list[int], target: list[bool]) -> tuple[list[int], list[bool]]:
        """Each modality tag id → its placeholder token repeated ``tokens per sample`` times."""
        tag_ids = {self.text.special_tokens[MODALITY_TAGS[m]]: m for m in MODALITY_TAGS
                   if MODALITY_TAGS[m] in self.text.special_tokens}
        out_ids: list[int] = []
        out_target: list[bool] = []
        for tok, tgt in zip(ids, target, strict=True):
            mod = tag_ids.get(tok)
            if mod is None:
                out_ids.append(tok)
                out_target.append(tgt)
                continue
            if mod not in self.placeholders:
                raise TokenizeError("tags", f"{MODALITY_TAGS[mod]} tag but the model's modalities are "
                                            f"{sorted(self.placeholders)}")
            token, count = self.placeholders[mod]
            out_ids += [token] * count
            out_target += [False] * count
        return out_ids, out_target

    def _check_tags_tokenized(self, text: str) -> None:
        for tag in _TAG_RE.findall(text):
            if self.text._tok.token_to_id(tag) is None:
                raise TokenizeError("tags", f"{tag} is not a token of the tokenizer; import the LM with "
                                            f"jobs/convert.py, which adds the modality tags")

    def _encode_jinja(self, turns: list[tuple[str, str | None]], open_last: bool) -> tuple[list[int], list[bool], int]:
        messages: list[dict[str, str]] = []
        spans: list[tuple[int, int, str]] = []
        for k, (human, answer) in enumerate(turns):
            messages.append({"role": "user", "content": human})
            if open_last and k == len(turns) - 1:
                break
            self._encode_answer(answer or "")
            start = len(self._render(messages, True))
            messages.append({"role": "assistant", "content": answer or ""})
            rendered = self._render(messages, False)
            spans.append((start, len(rendered), rendered))
        text = self._render(messages, open_last)
        for _, end, rendered in spans:
            if text[:end] != rendered:
                raise ValueError("the chat template renders earlier turns differently once later turns follow; "
                                 "it cannot mark the answers to train on")
        self._check_tags_tokenized(text)
        ids, offsets = self.text.encode_with_offsets(text)
        target = [any(a <= off < b for a, b, _ in spans) for off in offsets]
        ids, target = self._expand_tags(ids, target)
        return ids, target, len(ids)

    def _encode_raw(self, turns: list[tuple[str, str | None]], open_last: bool) -> tuple[list[int], list[bool], int]:
        human, answer = turns[-1]
        if isinstance(self.text, HFTokenizer):
            self._check_tags_tokenized(human)
            ids, _ = self.text.encode_with_offsets(human, add_special_tokens=True)
            ids, target = self._expand_tags(ids, [False] * len(ids))
        else:
            ids = self._encode_human(human)
            target = [False] * len(ids)
        prompt_len = len(ids)
        if not open_last:
            chunk = self._encode_answer(answer or "") + [self.eos_id]
            ids, target = ids + chunk, target + [True] * len(chunk)
        return ids, target, prompt_len

    # ----- encoding
    def _encode_human(self, text: str) -> list[int]:
        ids: list[int] = []
        pos = 0
        for match in self._tag_re.finditer(text):
            ids += self.text.encode_text(text[pos : match.start()])
            mod = self._tag_modalities[match.group()]
            if mod not in self.placeholders:
                raise TokenizeError(
                    "tags", f"{match.group()} tag but the model's modalities are {sorted(self.placeholders)}"
                )
            token, count = self.placeholders[mod]
            if not count:
                raise TokenizeError(
                    "tags", f"{match.group()}: set model.modality_tokens.{mod} (embedding rows per item)"
                )
            ids += [token] * count
            pos = match.end()
        return ids + self.text.encode_text(text[pos:])

    def _encode_answer(self, text: str) -> list[int]:
        if self._tag_re.search(text):
            raise TokenizeError("tags", f"a gpt answer contains a modality tag: {text!r:.80}")
        return self.text.encode_text(text)

    def _encode_turns(self, turns: list[tuple[str, str | None]], open_last: bool) -> tuple[list[int], list[bool], int]:
        if self.mode == "jinja":
            return self._encode_jinja(turns, open_last)
        if self.mode == "raw":
            return self._encode_raw(turns, open_last)
        ids: list[int] = []
        target: list[bool] = []
        prompt_len = 0
        for k, (human, answer) in enumerate(turns):
            trained = False
            for kind, value in self._segments:
                if kind == "answer":
                    if open_last and k == len(turns) - 1:
                        return ids, target, len(ids)
                    trained = True
                    chunk = self._encode_answer(answer or "")
                elif kind == "human":
                    chunk = self._encode_human(human)
                elif kind == "special":
                    chunk = [value]
                else:
                    chunk = self.text.encode_text(value)
                ids += chunk
                target += [trained] * len(chunk)
            prompt_len = len(ids)
        return ids, target, prompt_len

    def _finish(self, ids: list[int], target: list[bool], prompt_len: int, answer: str | None) -> Encoded:
        if len(ids) > self.seq_length:
            raise TokenizeError(
                "text", f"conversation is {len(ids)} tokens with placeholders; model.lm.seq_length={self.seq_length}"
            )
        return Encoded(np.asarray(ids, dtype=np.int64), np.asarray(target, dtype=bool), prompt_len, answer)

    def encode(self, conversations: list[dict[str, Any]]) -> Encoded:
        """A training conversation (every human turn answered).

        Raises:
            TokenizeError: ``manifest`` (malformed turns), ``tags`` (a tag for a modality the model lacks),
                ``text`` (longer than ``seq_length``).
        """
        turns = conversation_turns(conversations, allow_open=False)
        ids, target, _ = self._encode_turns(turns, open_last=False)
        return self._finish(ids, target, len(ids), None)

    def encode_prompt(self, conversations: list[dict[str, Any]]) -> Encoded:
        """The prompt for generation: earlier turns in full, the last human turn up to and including
        ``<|assistant|>``; ``answer`` is the last gpt value when the conversation has one (the reference).
        """
        turns = conversation_turns(conversations, allow_open=True)
        answer = turns[-1][1]
        ids, target, prompt_len = self._encode_turns(turns, open_last=True)
        return self._finish(ids, target, prompt_len, answer)

    def pad(self, enc: Encoded) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Right-pad to ``seq_length``: ``(input_ids int64 [S], labels int64 [S], loss_mask float32 [S])``.

        ``labels[t] = input_ids[t+1]`` where that token is a target, else -100; ``loss_mask[t] = 1`` exactly there.
        """
        seq = self.seq_length
        n = enc.ids.size
        input_ids = np.full(seq, self.pad_id, dtype=np.int64)
        input_ids[:n] = enc.ids
        trained = np.zeros(seq, dtype=bool)
        trained[: n - 1] = enc.target[1:n]
        labels = np.where(trained, np.roll(input_ids, -1), IGNORE_INDEX)
        return input_ids, labels, trained.astype(np.float32)

    def decode(self, ids: list[int] | np.ndarray, *, stop_at_eos: bool = True) -> str:
        """Generated ids → text, cut at the first ``<eos>``; special tokens dropped."""
        ids = [int(i) for i in ids]
        if stop_at_eos and self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.text.decode(ids)


def template_mode(chat_template: str) -> str:
    """``raw`` (:data:`RAW_TEMPLATE`), ``jinja`` (a Hugging Face template) or ``simple`` (``{human}``/``{answer}``)."""
    if chat_template == RAW_TEMPLATE:
        return "raw"
    return "jinja" if "{%" in chat_template or "{{" in chat_template else "simple"


def resolve_template(value: str | None) -> str:
    """A ``data.chat_template`` value → template text: ``None`` is the default, an existing file is read.

    Raises:
        ValueError: naming ``data.chat_template`` when a path-like value names no file.
    """
    if value is None:
        return DEFAULT_CHAT_TEMPLATE
    if value == RAW_TEMPLATE or "{" in value:
        return value
    path = Path(value)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise ValueError(f"data.chat_template={value!r} is neither a template (with {{human}}/{{answer}} or Jinja), "
                     f"'none', nor an existing file")
