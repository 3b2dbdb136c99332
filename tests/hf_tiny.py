"""Tiny random Hugging Face models built offline from config objects (non-zero biases) for the convert tests."""

from __future__ import annotations

import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|>\n{{ m['content'] }}\n"
    "{% else %}<|assistant|>\n{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
WORDS = "the a cat dog sat on mat red blue green one two three is was and of to in what color say hello world".split()


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights and biases from N(0, 0.05^2), norm scales from N(1, 0.1^2): no mapping bug hides behind 0 / 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm_scale = p.dim() == 1 and name.endswith("weight")
            p.copy_(1.0 + 0.1 * noise if is_norm_scale else 0.05 * noise)
    return model


def make_tokenizer(path, chat_template: str | None = CHAT_TEMPLATE):
    """A small word-level fast tokenizer with <s>, </s>, <unk>, <pad>, saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<|user|>": 4, "<|assistant|>": 5}
    for w in WORDS + list("?.,!:\n"):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>"])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    return fast


def llama_config(**kw):
    base = dict(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2, pad_token_id=3)
    base.update(kw)
    return transformers.LlamaConfig(**base)



def build_hf_dirs(root: Path, names: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Save tiny HF models under ``root``: clip, clip_full (CLIPModel), whisper, llama (untied GQA), llama_tied,
    llama3 (RoPE scaling), mistral (1 KV group), qwen2, llama_small_vocab (HF rows == tokenizer size); ``names``
    picks a subset."""
    want = set(names) if names else None
    out: dict[str, Path] = {}
    vcfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, image_size=16, patch_size=4, hidden_act="quick_gelu")

    def clip_full():
        cfg = transformers.CLIPConfig(
            text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             vocab_size=40, max_position_embeddings=16),
            vision_config=vcfg.to_dict(), projection_dim=8)
        return randomize_(transformers.CLIPModel(cfg), 2)

    def whisper():
        cfg = transformers.WhisperConfig(vocab_size=40, d_model=32, encoder_layers=2, decoder_layers=1,
                                         encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                         decoder_ffn_dim=64, num_mel_bins=80, max_source_positions=50,
                                         max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                         decoder_start_token_id=1)
        model = randomize_(transformers.WhisperForConditionalGeneration(cfg), 3)
        with torch.no_grad():  # an fp16-rounded table, like openai checkpoints
            pos = model.model.encoder.embed_positions.weight
            pos.copy_((pos * 20).half().float())
        return model

    llama3_rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
    builders = {
        "clip": lambda: randomize_(transformers.CLIPVisionModel(vcfg), 1),
        "clip_full": clip_full,
        "whisper": whisper,
        "llama": lambda: randomize_(transformers.LlamaForCausalLM(llama_config()), 4),
        "llama_tied": lambda: randomize_(transformers.LlamaForCausalLM(
            llama_config(tie_word_embeddings=True, num_key_value_heads=4)), 4),
        "llama3": lambda: randomize_(transformers.LlamaForCausalLM(
            llama_config(rope_theta=10000.0, rope_scaling=llama3_rope)), 4),
        "mistral": lambda: randomize_(transformers.MistralForCausalLM(transformers.MistralConfig(
            vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, max_position_embeddings=256, sliding_window=128, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2)), 4),
        "qwen2": lambda: randomize_(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=True,
            bos_token_id=1, eos_token_id=2)), 4),
    }
    for name, build in builders.items():
        if want is None or name in want:
            torch.manual_seed(0)
            build().save_pretrained(root / name)
            if name not in ("clip", "clip_full", "whisper"):
                make_tokenizer(root / name)
            out[name] = root / name
    if want is None or "llama_small_vocab" in want:
        # An HF vocabulary exactly as long as the tokenizer: the modality tags need new rows.
        small = root / "llama_small_vocab"
        rows = len(make_tokenizer(small))
        randomize_(transformers.LlamaForCausalLM(llama_config(vocab_size=rows)), 5).save_pretrained(small)
        out["llama_small_vocab"] = small
    return out
