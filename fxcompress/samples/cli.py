"""`fxcompress train|test|export`: NNCF's sample command line (docs/samples.md).

    fxcompress train  --config C [--data DIR] [--weights W] [--resume CKPT] [--log-dir D] [--to-onnx F]
    fxcompress test   --config C [--data DIR] [--weights W | --resume CKPT]
    fxcompress export --config C --to-onnx F [--resume CKPT | --weights W --data DIR]

plus ``--seed N --workers N --cpu-only --epochs N --batch-size N``; command-line values override
the config. A user error prints one line ``fxcompress: error: ...`` and exits with code 2
having written nothing. The same command under ``torchrun --nproc_per_node N`` trains with
DistributedDataParallel.
"""
from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import sys

from fxcompress.samples.config import apply_overrides, read_config, validate
from fxcompress.samples.task import SampleError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other user error (argparse prints usage too)
        raise SampleError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fxcompress", description="Compress and fine-tune a model from an NNCF-style JSON "
                                                    "config (training samples: docs/samples.md).")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    helps = {"train": "compress, fine-tune, checkpoint and log (and export with --to-onnx)",
             "test": "evaluate the fp32 model and a compressed checkpoint (--resume) or fresh compression",
             "export": "write the compressed model as ONNX (--to-onnx)"}
    for name, text in helps.items():
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("--config", required=True, help="NNCF-style JSON config (comments allowed)")
        sub.add_argument("--data", help="dataset directory (not needed for \"dataset\": \"digits\")")
        sub.add_argument("--weights", help="fp32 model weights to start from (a state dict)")
        sub.add_argument("--resume", help="a checkpoint of `fxcompress train` (last.pth / best.pth)")
        sub.add_argument("--to-onnx", dest="to_onnx", required=name == "export", help="write the ONNX model here")
        sub.add_argument("--seed", type=int, help="random seed (default: the config's, else 0)")
        sub.add_argument("--workers", type=int, help="data-loading worker processes (default 0)")
        sub.add_argument("--batch-size", dest="batch_size", type=int, help="overrides the config's batch_size")
        sub.add_argument("--cpu-only", dest="cpu_only", action="store_true", help="do not use CUDA")
        if name == "train":
            sub.add_argument("--log-dir", dest="log_dir", help="where logs and checkpoints go "
                                                               "(default: the config's log_dir, else runs/<config>-<time>)")
            sub.add_argument("--epochs", type=int, help="overrides the config's epochs")
    return parser


def _log_dir(args, config: dict) -> pathlib.Path:
    if args.log_dir is not None:
        return pathlib.Path(args.log_dir)
    if args.resume is not None:  # continue writing where the checkpoint came from
        return pathlib.Path(args.resume).parent
    if config.get("log_dir"):
        return pathlib.Path(config["log_dir"])
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return pathlib.Path("runs") / f"{pathlib.Path(args.config).stem}-{stamp}"


def _check_log_dir(log_dir: pathlib.Path, resume):
    if log_dir.exists() and not log_dir.is_dir():
        raise SampleError(f"--log-dir {log_dir}: exists and is not a directory")
    if resume is None and (log_dir / "last.pth").exists():
        raise SampleError(f"--log-dir {log_dir}: already holds a run (last.pth); continue it with "
                          f"--resume {log_dir / 'last.pth'} or choose another --log-dir")


def run(args) -> dict:
    # Imported here so that `fxcompress --help` and command-line errors stay fast.
    from fxcompress.samples import runner
    from fxcompress.samples.reporting import RunLog
    from fxcompress.samples.tasks import task_for_config

    overrides = {"seed": args.seed, "workers": args.workers, "batch_size": args.batch_size,
                 "epochs": getattr(args, "epochs", None)}
    config = validate(apply_overrides(read_config(args.config), **overrides))
    task = task_for_config(config)
    if args.command == "train" and args.resume is not None and args.weights is not None:
        raise SampleError("--weights and --resume: give one (a resumed run has its weights in the checkpoint)")
    needs_data = not (args.command == "export" and args.resume is not None)
    log_dir = None
    if args.command == "train":
        log_dir = _log_dir(args, config)
        _check_log_dir(log_dir, args.resume)
    prepared = runner.prepare(task, config, args.data, args.weights, args.resume, needs_data)
    # Nothing was written so far: every user error above ended the run cleanly.
    processes = runner.start_processes(args.cpu_only)
    try:
        log = RunLog(log_dir, main=processes.is_main)
        run = runner.Runner(prepared, processes, config["workers"], log)
        if args.command == "train":
            return run.train(args.to_onnx)
        if args.command == "test":
            return run.test()
        run.export_only(args.to_onnx)
        return {}
    finally:
        runner.stop_processes(processes)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        run(args)
    except SampleError as error:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank finds the same error
            print(f"fxcompress: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fxcompress: interrupted", file=sys.stderr)
        return 130
    return 0
