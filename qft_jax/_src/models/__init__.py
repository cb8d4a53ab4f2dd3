"""The LLaMA model family, checkpoint loaders, tokenizers and decoding."""
