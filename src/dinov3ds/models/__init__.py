"""Models: the DINOv3 variants and their weights, frozen backbones, Classifier / Segmenter, checkpoints, inference."""
