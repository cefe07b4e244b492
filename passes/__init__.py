"""The compression algorithms and their lowering passes (imported as ``fxcompress.passes``).

Each algorithm is a ``CompressionPass``; importing this package registers them
for JSON configs by their NNCF names.
"""
