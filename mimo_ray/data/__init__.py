"""Data loading: manifests, media decoding and tokenisation for mimo_ray."""
