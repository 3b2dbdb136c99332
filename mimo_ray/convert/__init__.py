"""Hugging Face ↔ mimo_ray checkpoints: read local HF directories tensor by tensor, map their keys and layouts onto
the Megatron modules (CLIP vision, Whisper encoder, LLaMA-family / Qwen2 LMs), write a step-0 checkpoint, and export
a trained checkpoint back to directories that ``transformers`` loads.
"""
