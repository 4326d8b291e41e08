"""Datasets: photos and captions from folders, configs or other nodes (`datasets`), decoded and
shaped into buckets (`images`), augmented (`augment`), encoded once into latents and text
embeddings with a cache (`encode`), captioned by a VLM (`captioning`), and looked at (`report`)."""
