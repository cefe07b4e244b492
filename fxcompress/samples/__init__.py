"""Training samples: `fxcompress train|test|export --config C --data DIR` (docs/samples.md).

One task-independent runner (cli.py, runner.py) drives the tasks listed in tasks.py through
the Task contract in task.py.
"""


def write_digits_imagefolder(root, *, size: int = 8):
    """scikit-learn's digits written as an ImageFolder tree (``root/{train,val}/<digit>/<n>.png``)."""
    from fxcompress.samples.classification import write_digits_imagefolder as write
    return write(root, size=size)
