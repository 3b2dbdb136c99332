"""CLIP's per-channel RGB statistics, torch-free (the decode workers import them without loading torch)."""

#: Mean of CLIP's training images per RGB channel, in [0, 1] (the ViT encoders were trained on inputs normalised
#: with these; images are padded with this colour, see :mod:`mimo_ray.media.geometry`).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
#: Standard deviation per RGB channel, in [0, 1].
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
