"""Data pipeline: the .beton schema, sources, the one pair decoder, tokenizer, EDA, augmentation,
dataset writing and loaders."""
