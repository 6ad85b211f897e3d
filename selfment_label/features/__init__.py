"""Features: backbone presets, loading a frozen ViT, patch tokens, and their on-disk cache."""
