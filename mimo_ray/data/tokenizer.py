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

#: The byte tokenizer's special tokens (ids 256…265); a Hugging Face tokenizer gets the same names.
SPECIAL_TOKENS: dict[str, int] = {
    "<pad>": 256,
    "<bos>": 257,
    "<eos>": 258,
    "<|user|>": 259,
    "<|assistant|>": 260,
    "<video>": 261,
    "<audio>": 262,
    "<image>": 263,
    "<image_gen>": 264,
    "<audio_gen>": 265,
}
#: The tag that stands for each input modality in a human turn.
MODALITY_TAGS: dict[str, str] = {"video": "<video>", "audio": "<audio>", "images": "<image>"}
TAG_MODALITIES: dict[str, str] = {tag: mod for mod, tag in MODALITY_TAGS.items()}
DEFAULT_CHAT_TEMPLATE = "<bos><|user|>{human}<|assistant|>{answer}<eos>"
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
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"data.tokenizer={str(path)!r}: no such tokenizer.json file")
        return cls(path.read_text(encoding="utf-8"))

    @property
    def vocab_size(self) -> int:
        return max(self._tok.get_vocab_size(with_added_tokens=True), max(self.special_tokens.values()) + 1)

    def encode_text(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids) if text else []

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


def count_tags(conversations: list[dict[str, Any]]) -> dict[str, int]:
    """How often each modality tag occurs in the human turns: ``{"video": 1, "audio": 1, "images": 0}``."""
    counts = dict.fromkeys(MODALITY_TAGS, 0)
    for i, msg in enumerate(conversations):
        if i % 2 == 0 and isinstance(msg, dict) and isinstance(msg.get("value"), str):
            for tag in _TAG_RE.findall(msg["value"]):
                counts[TAG_MODALITIES[tag]] += 1
    return counts


class ChatTokenizer:
    """Chat template + placeholder expansion over a byte or Hugging Face text tokenizer.

    Args:
        text: the text tokenizer.
        placeholders: ``{modality: (special token id, tokens per sample)}`` for the model's input modalities.
        seq_length: the LM's sequence length; longer encodings raise ``TokenizeError("text")``.
        chat_template: per-turn template with ``{human}`` and ``{answer}`` and special-token names.

    Raises:
        ValueError: a malformed template, or a special-token name the tokenizer does not have.
    """

    def __init__(
        self,
        text: ByteTokenizer | HFTokenizer,
        placeholders: dict[str, tuple[int, int]],
        seq_length: int,
        chat_template: str = DEFAULT_CHAT_TEMPLATE,
    ) -> None:
        self.text = text
        self.placeholders = {m: (int(t), int(n)) for m, (t, n) in placeholders.items()}
        self.seq_length = int(seq_length)
        self.chat_template = chat_template
        self.pad_id = text.special_tokens["<pad>"]
        self.eos_id = text.special_tokens["<eos>"]
        self._segments = self._parse_template(chat_template)

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
        for mod in cfg.model.modalities:
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
        return cls(text, placeholders, cfg.model.lm.seq_length)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state: text tokenizer, chat template, special-token ids, placeholder counts, seq_length."""
        return {
            "format": FORMAT,
            "text_tokenizer": self.text.to_dict(),
            "special_tokens": dict(self.text.special_tokens),
            "chat_template": self.chat_template,
            "placeholders": {m: list(v) for m, v in self.placeholders.items()},
            "seq_length": self.seq_length,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChatTokenizer:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a saved ChatTokenizer (format={data.get('format')!r}, expected {FORMAT!r})")
        placeholders = {m: (int(v[0]), int(v[1])) for m, v in data["placeholders"].items()}
        text = _text_tokenizer_from_dict(data["text_tokenizer"])
        return cls(text, placeholders, int(data["seq_length"]), data["chat_template"])

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

    # ----- encoding
    def _encode_human(self, text: str) -> list[int]:
        ids: list[int] = []
        pos = 0
        for match in _TAG_RE.finditer(text):
            ids += self.text.encode_text(text[pos : match.start()])
            mod = TAG_MODALITIES[match.group()]
            if mod not in self.placeholders:
                raise TokenizeError(
                    "tags", f"{match.group()} tag but the model's modalities are {sorted(self.placeholders)}"
                )
            token, count = self.placeholders[mod]
            ids += [token] * count
            pos = match.end()
        return ids + self.text.encode_text(text[pos:])

    def _encode_answer(self, text: str) -> list[int]:
        if _TAG_RE.search(text):
            raise TokenizeError("tags", f"a gpt answer contains a modality tag: {text!r:.80}")
        return self.text.encode_text(text)

    def _encode_turns(self, turns: list[tuple[str, str | None]], open_last: bool) -> tuple[list[int], list[bool], int]:
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


def pack_encodings(encodings: list[Encoded], seq_length: int, pad_id: int) -> list[dict[str, Any]]:
    """Greedily pack encodings, in order, into rows of ``seq_length`` (sequence packing).

    Position ids restart at 0 for every packed sample and no label crosses a sample boundary. Media of the packed
    samples must be concatenated in the same order (placeholder counts stay per sample, rows batch-major).

    Returns:
        One dict per row: ``input_ids``, ``position_ids``, ``labels`` (int64 ``[S]``), ``loss_mask`` (float32
        ``[S]``) and ``samples`` (indices into ``encodings``).

    Raises:
        ValueError: an encoding longer than ``seq_length``.
    """
    rows: list[dict[str, Any]] = []
    current: list[int] = []
    used = 0
    for k, enc in enumerate(encodings):
        if enc.ids.size > seq_length:
            raise ValueError(f"encoding {k} has {enc.ids.size} tokens > seq_length={seq_length}")
        if used + enc.ids.size > seq_length:
            rows.append(_packed_row([encodings[i] for i in current], current, seq_length, pad_id))
            current, used = [], 0
        current.append(k)
        used += enc.ids.size
    if current:
        rows.append(_packed_row([encodings[i] for i in current], current, seq_length, pad_id))
    return rows


def _packed_row(encs: list[Encoded], indices: list[int], seq: int, pad_id: int) -> dict[str, Any]:
    input_ids = np.full(seq, pad_id, dtype=np.int64)
    position_ids = np.zeros(seq, dtype=np.int64)
    labels = np.full(seq, IGNORE_INDEX, dtype=np.int64)
    loss_mask = np.zeros(seq, dtype=np.float32)
    start = 0
    for enc in encs:
        n = enc.ids.size
        input_ids[start : start + n] = enc.ids
        position_ids[start : start + n] = np.arange(n)
        trained = enc.target[1:n]
        idx = start + np.nonzero(trained)[0]
        labels[idx] = enc.ids[1:n][trained]
        loss_mask[idx] = 1.0
        start += n
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "labels": labels,
        "loss_mask": loss_mask,
        "samples": list(indices),
    }

