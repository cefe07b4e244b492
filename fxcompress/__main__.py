"""`python -m fxcompress train|test|export ...`: the same as the `fxcompress` command (docs/samples.md)."""
import sys

from fxcompress.samples.cli import main

if __name__ == "__main__":
    sys.exit(main())
