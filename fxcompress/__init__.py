"""fxcompress."""
