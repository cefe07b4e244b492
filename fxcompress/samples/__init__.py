"""Training samples: `fxcompress train|test|export --config C --data DIR` (docs/samples.md).

One task-independent runner (cli.py, runner.py) drives the tasks listed in tasks.py through
the Task contract in task.py.
"""
