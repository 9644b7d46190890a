"""Data: sources, tokenizers and the grain input pipeline. Never imports the model."""
