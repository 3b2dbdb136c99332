"""``mimo_ray.encode_conversation``: one LLaVA-style conversation → the ``[S]`` rows of a C1 batch, with the run's
tokenizer and chat template (what the manifest pipeline makes), for users who build their own batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mimo_ray.config import Config


def encode_conversation(
    cfg: Config, conversations: Sequence[dict[str, str]], mimo_config: Any = None
) -> dict[str, np.ndarray]:
    """Tokenise a conversation like the training pipeline does.

    Args:
        cfg: the config (``data.tokenizer``, ``data.chat_template``, ``model.lm.seq_length``,
            ``model.modality_tokens``).
        conversations: ``[{"from": "human", "value": "<depth> How far?"}, {"from": "gpt", "value": "near"}, ...]``;
            each modality tag expands to that modality's placeholder tokens (``model.modality_tokens`` for a user
            modality).
        mimo_config: the run's ``MimoModelConfig`` when it adds modalities to ``cfg`` (their tags and ids).

    Returns:
        ``{"input_ids", "labels", "loss_mask", "position_ids"}``, each ``[S]`` (``S = model.lm.seq_length``;
        ``labels[t] = input_ids[t+1]`` on answer tokens, else -100; ``loss_mask`` 1 exactly there).

    Raises:
        ValueError: a malformed conversation, a tag of a modality the model lacks, or too many tokens.
    """
    from mimo_ray.data.tokenizer import ChatTokenizer

    if mimo_config is not None:
        from mimo_ray.model.spec_source import config_for_spec

        cfg = config_for_spec(cfg, mimo_config)
    tok = ChatTokenizer.from_config(cfg)
    input_ids, labels, loss_mask = tok.pad(tok.encode(list(conversations)))
    return {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask,
            "position_ids": np.arange(input_ids.size, dtype=np.int64)}
