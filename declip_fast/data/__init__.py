"""Data pipeline: tokenizer, EDA, augmentation, dataset writing and loaders."""
