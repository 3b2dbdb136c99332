"""Chat tokenizer: placeholders, labels/loss_mask, prompt encodings, persistence, HF tokenizer.json, packing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mimo_ray.config_cli import load_config
from mimo_ray.data.tokenizer import (
    IGNORE_INDEX,
    SPECIAL_TOKENS,
    ChatTokenizer,
    TokenizeError,
)
from mimo_ray.model.spec import tokens_per_sample

QUESTION = "<video>\n<audio>\nWhat colour is the ball and which note is playing?"


def conv(*turns: str) -> list[dict[str, str]]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny")


@pytest.fixture(scope="module")
def tok(cfg):
    return ChatTokenizer.from_config(cfg)


def test_placeholder_counts_equal_tokens_per_sample(cfg, tok):
    enc = tok.encode(conv(QUESTION, "red, A"))
    for mod in cfg.model.modalities:
        assert int((enc.ids == cfg.model.special_token_ids[mod]).sum()) == tokens_per_sample(cfg, mod)
    # The placeholders of one tag are contiguous and sit where the tag was.
    video = np.nonzero(enc.ids == cfg.model.special_token_ids["video"])[0]
    assert np.array_equal(video, np.arange(video[0], video[0] + video.size))
    assert enc.ids[:2].tolist() == [SPECIAL_TOKENS["<bos>"], SPECIAL_TOKENS["<|user|>"]]


def test_labels_and_loss_mask_cover_exactly_answer_and_eos(tok):
    answer = "red, A"
    input_ids, labels, loss_mask = tok.pad(tok.encode(conv(QUESTION, answer)))
    assert input_ids.shape == labels.shape == loss_mask.shape == (tok.seq_length,)
    trained = np.nonzero(loss_mask)[0]
    # Positions t whose next token is an answer byte or <eos>: labels are those next tokens, nothing else.
    assert labels[trained].tolist() == list(answer.encode()) + [SPECIAL_TOKENS["<eos>"]]
    assert np.array_equal(labels[trained], input_ids[trained + 1])
    assert (labels[loss_mask == 0] == IGNORE_INDEX).all()
    # The position predicting the first answer byte is <|assistant|>.
    assert input_ids[trained[0]] == SPECIAL_TOKENS["<|assistant|>"]
    n = int((input_ids != SPECIAL_TOKENS["<pad>"]).sum())
    assert (input_ids[n:] == SPECIAL_TOKENS["<pad>"]).all() and input_ids[n - 1] == SPECIAL_TOKENS["<eos>"]


def test_multi_turn_trains_every_answer(tok):
    enc = tok.encode(conv(QUESTION, "red, A", "And the note again?", "A"))
    _, labels, mask = tok.pad(enc)
    eos = SPECIAL_TOKENS["<eos>"]
    assert labels[mask == 1].tolist() == list(b"red, A") + [eos] + list(b"A") + [eos]
    assert int((enc.ids == SPECIAL_TOKENS["<bos>"]).sum()) == 2  # the template applies per turn


def test_prompt_encoding_ends_after_assistant(tok):
    full = tok.encode(conv(QUESTION, "red, A"))
    prompt = tok.encode_prompt(conv(QUESTION, "red, A"))
    assert prompt.answer == "red, A"
    assert prompt.ids[-1] == SPECIAL_TOKENS["<|assistant|>"] and prompt.prompt_len == prompt.ids.size
    assert np.array_equal(prompt.ids, full.ids[: prompt.ids.size])
    open_prompt = tok.encode_prompt(conv(QUESTION))
    assert open_prompt.answer is None and np.array_equal(open_prompt.ids, prompt.ids)
    assert tok.decode([*b"blue, C", SPECIAL_TOKENS["<eos>"], *b"junk"]) == "blue, C"


def test_errors_name_their_stage(cfg, tok):
    with pytest.raises(TokenizeError) as err:
        tok.encode(conv(QUESTION + " " + "x" * cfg.model.lm.seq_length, "red"))
    assert err.value.stage == "text" and "seq_length" in str(err.value)
    with pytest.raises(TokenizeError) as err:
        tok.encode(conv("<image> what is this?", "a ball"))
    assert err.value.stage == "tags"
    with pytest.raises(TokenizeError) as err:
        tok.encode([{"from": "gpt", "value": "hi"}])
    assert err.value.stage == "manifest"
    with pytest.raises(TokenizeError):
        tok.encode(conv(QUESTION))  # no answer to train on


def test_round_trip_to_dict(tok):
    data = json.loads(json.dumps(tok.to_dict()))
    again = ChatTokenizer.from_dict(data)
    c = conv(QUESTION, "green, E")
    assert np.array_equal(again.encode(c).ids, tok.encode(c).ids)
    assert data["special_tokens"]["<video>"] == 261 and data["chat_template"].startswith("<bos>")


def test_config_mismatch_names_the_field():
    cfg = load_config("tiny", ["model.special_token_ids={video: 300, audio: 262, images: 263}"])
    with pytest.raises(ValueError, match="model.special_token_ids.video"):
        ChatTokenizer.from_config(cfg)


def test_hf_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.train_from_iterator(["what colour is the ball and which note is playing red green blue A C"] * 4,
                           trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]"]))  # fmt: skip
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    base = hf.get_vocab_size(with_added_tokens=True)
    ids = {m: base + 5 + k for k, m in enumerate(["video", "audio", "images"])}  # after <pad> … <|assistant|>
    cfg = load_config(
        "tiny",
        [f"data.tokenizer={path}", "model.lm.vocab_size=512",
         f"model.special_token_ids={{video: {ids['video']}, audio: {ids['audio']}, images: {ids['images']}}}"],
    )  # fmt: skip
    tok = ChatTokenizer.from_config(cfg)
    enc = tok.encode(conv(QUESTION, "red A"))
    assert int((enc.ids == ids["video"]).sum()) == tokens_per_sample(cfg, "video")
    assert tok.decode(enc.ids[enc.target]).replace(" ", "") == "redA"
    again = ChatTokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert np.array_equal(again.encode(conv(QUESTION, "red A")).ids, enc.ids)
