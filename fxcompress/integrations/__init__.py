"""Integrations with training frameworks: ``fxcompress.integrations.transformers`` (Hugging Face Trainer).

Each integration imports its framework lazily, so ``import fxcompress`` never needs it.
"""
