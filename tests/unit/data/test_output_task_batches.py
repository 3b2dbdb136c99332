"""Output-task rows: generation tags become exactly K trained generation tokens; targets load in sample order."""

import numpy as np
import pytest
import soundfile

from mimo_ray.config_cli import load_config
from mimo_ray.data.output_tasks import OutputChatTokenizer, OutputTaskBatches, collate_output_rows
from mimo_ray.data.tokenizer import ChatTokenizer
from mimo_ray.media.files import write_png

CFG = ["model.outputs.image_out.enabled=true", "model.outputs.audio_out.enabled=true", "model.lm.seq_length=40"]


def _rows(tmp_path):
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[..., 0] = 200
    write_png(tmp_path / "a.png", image)
    soundfile.write(tmp_path / "b.wav", 0.5 * np.ones(4000, dtype=np.float32), 8000)  # resampled, padded
    conv = [{"from": "human", "value": "Draw."}, {"from": "gpt", "value": "<image_gen>"}]
    play = [{"from": "human", "value": "Play."}, {"from": "gpt", "value": "<audio_gen>"}]
    return [
        {"id": "a", "conversations": conv, "image_out": str(tmp_path / "a.png")},
        {"id": "b", "conversations": play, "audio_out": str(tmp_path / "b.wav")},
    ]


def test_tags_expand_to_k_trained_tokens_and_targets_load(tmp_path):
    cfg = load_config("tiny", CFG)
    tok = OutputChatTokenizer(ChatTokenizer.from_config(cfg), cfg.model.outputs.active())
    batch = collate_output_rows(cfg, tok, _rows(tmp_path))
    ids, mask = batch["input_ids"], batch["loss_mask"]
    assert (ids[0] == 264).sum() == 4 and (ids[1] == 265).sum() == 4 and (ids == 265)[0].sum() == 0
    # Every generation token is a trained target (predicted from its predecessor), and so is <eos>.
    gen_pos = (ids[0] == 264).nonzero().flatten()
    assert mask[0, gen_pos - 1].eq(1).all()
    assert batch["output_targets"]["image_out"].shape == (1, 3, 64, 64)
    assert int(batch["output_targets"]["image_out"][0, 0, 5, 5]) == 200
    assert batch["output_targets"]["audio_out"].shape == (1, 8000)
    batches = iter(OutputTaskBatches(cfg, _rows(tmp_path), micro_batch_size=2, seed=0))
    assert set(next(batches)["output_targets"]) == {"image_out", "audio_out"}


def test_missing_target_field_names_the_row(tmp_path):
    cfg = load_config("tiny", CFG)
    tok = OutputChatTokenizer(ChatTokenizer.from_config(cfg), cfg.model.outputs.active())
    row = _rows(tmp_path)[0]
    del row["image_out"]
    with pytest.raises(ValueError, match="row 'a'.*image_out"):
        collate_output_rows(cfg, tok, [row])
