"""The task-independent sample runner: data loaders, fp32 evaluation, compression, the training
loop, checkpoints, logging and distributed training (docs/samples.md).

Everything that can fail because of the user's input (config, model name, data layout,
checkpoint) is checked in ``prepare`` before anything is written.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from fxcompress import Config, compile_for_compression, load_state
from fxcompress.checkpoint import rng_state, set_rng_state
from fxcompress.distributed import broadcast_from_rank0
from fxcompress.errors import FxCompressError
from fxcompress.samples.reporting import RunLog
from fxcompress.samples.task import SampleError, Task

CHECKPOINT_FORMAT = "fxcompress-sample-1"


# -- processes -----------------------------------------------------------------------------
@dataclasses.dataclass
class Processes:
    """This process's place in a torchrun job (a job of one without torchrun)."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def start_processes(cpu_only: bool) -> Processes:
    """Join the torchrun job the environment describes (gloo on CPU, NCCL on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and not cpu_only
    device = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device()) \
        if cuda else torch.device("cpu")
    if world_size == 1:
        return Processes(0, 1, device)
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    return Processes(dist.get_rank(), world_size, device)


def stop_processes(processes: Processes):
    if processes.distributed and dist.is_initialized():
        dist.destroy_process_group()


# -- optimizer and learning-rate schedule (NNCF's sample keys) -------------------------------
def make_optimizer(parameters, settings: dict) -> torch.optim.Optimizer:
    kind, lr, wd = settings["type"], settings["base_lr"], settings["weight_decay"]
    if kind == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=settings["momentum"], weight_decay=wd,
                               nesterov=settings["nesterov"] and settings["momentum"] > 0)
    optimizer = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
    return optimizer(parameters, lr=lr, weight_decay=wd)


def make_lr_scheduler(optimizer, settings: dict, epochs: int):
    kind = settings["schedule_type"]
    if kind == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=settings["steps"], gamma=settings["gamma"])
    if kind == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=settings["step"], gamma=settings["gamma"])
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    if kind == "plateau":  # on the validation metric (higher is better), as NNCF's samples
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=settings["gamma"],
                                                          patience=3, threshold=0.001)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


def step_lr_scheduler(scheduler, metric: float):
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(metric)
    else:
        scheduler.step()


# -- checkpoints ---------------------------------------------------------------------------
def read_checkpoint(path, flag: str) -> dict:
    path = pathlib.Path(path)
    if not path.is_file():
        raise SampleError(f"{flag} {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for a file that is not a checkpoint
        raise SampleError(f"{flag} {path}: not a PyTorch checkpoint ({str(error).splitlines()[0]})") from None
    return state


def fp32_state(state, path) -> dict:
    """A fp32 model state dict from a --weights file: a plain state dict, or one under
    'model' / 'state_dict' (as training scripts save), DDP's 'module.' prefixes removed."""
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SampleError(f"--weights {path}: not a model state dict")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


# -- the run -------------------------------------------------------------------------------
@dataclasses.dataclass
class Prepared:
    """Everything a run needs, built and checked before anything is written."""
    config: dict
    task: Task
    model: torch.nn.Module
    train_set: object
    val_set: object
    num_classes: int
    resume: dict | None
    ctrl: object
    gm: torch.fx.GraphModule


def prepare(task: Task, config: dict, data_dir, weights, resume, needs_data: bool) -> Prepared:
    resume_state = None
    if resume is not None:
        resume_state = read_checkpoint(resume, "--resume")
        if not isinstance(resume_state, dict) or resume_state.get("format") != CHECKPOINT_FORMAT:
            raise SampleError(f"--resume {resume}: not a checkpoint written by `fxcompress train` "
                              f"(for fp32 weights use --weights)")
    train_set = val_set = None
    if needs_data:
        train_set, val_set, num_classes = task.build_datasets(
            None if data_dir is None else pathlib.Path(data_dir), config)
    else:
        num_classes = resume_state["num_classes"]
    wanted = config.get("num_classes")
    if wanted is not None and wanted < num_classes:
        raise SampleError(f"config key 'num_classes': {wanted} is fewer than the dataset's {num_classes} classes")
    num_classes = wanted or num_classes
    if resume_state is not None and resume_state["num_classes"] != num_classes:
        raise SampleError(f"--resume {resume}: the checkpoint has {resume_state['num_classes']} classes, "
                          f"this run {num_classes}")
    torch.manual_seed(config["seed"])  # the same initial weights on every rank and every run
    model = task.build_model(config["model"], num_classes, config)
    if weights is not None:
        state = fp32_state(read_checkpoint(weights, "--weights"), weights)
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            first = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
            raise SampleError(f"--weights {weights}: does not fit model {config['model']!r}: {first}") from None
    ctrl, gm = compile_model(task, model, config)
    if resume_state is not None:
        try:
            load_state(gm, resume_state["model"])
            ctrl.load_state_dict(resume_state["controller"])
        except FxCompressError as error:
            raise SampleError(f"--resume {resume}: {str(error).splitlines()[0]}") from None
    return Prepared(config, task, model, train_set, val_set, num_classes, resume_state, ctrl, gm)


# The top-level keys of a config that concern compression (the others are the sample's).
COMPRESSION_KEYS = ("input_info", "compression", "target_device", "ignored_scopes", "target_scopes",
                    "compression_lr_multiplier", "accuracy_aware_training", "disable_shape_matching")


def compile_model(task: Task, model: torch.nn.Module, config: dict):
    """(ctrl, gm) for the config's compression section; SampleError for a bad one."""
    example = (task.example_input(config),)
    try:
        if not config.get("compression"):  # no compression section: the fp32 model trains as it is
            return compile_for_compression(model, [], example_inputs=example, copy=True)
        compression = Config({k: v for k, v in config.items() if k in COMPRESSION_KEYS})
        return compile_for_compression(model, compression, example_inputs=example, copy=True)
    except FxCompressError as error:
        raise SampleError(str(error).splitlines()[0]) from None


class Runner:
    def __init__(self, prepared: Prepared, processes: Processes, workers: int, log: RunLog | None):
        self.p, self.processes, self.log = prepared, processes, log
        self.task, self.config, self.device = prepared.task, prepared.config, processes.device
        self.workers = workers

    # -- data --------------------------------------------------------------------------
    def train_loader(self):
        # Every rank shuffles with the same seed, epoch by epoch (set_epoch), and takes its share;
        # one process is a job of one, so resumed runs see the same order as uninterrupted ones.
        self.sampler = DistributedSampler(self.p.train_set, num_replicas=self.processes.world_size,
                                          rank=self.processes.rank, shuffle=True, seed=self.config["seed"])
        return DataLoader(self.p.train_set, batch_size=self.config["batch_size"], sampler=self.sampler,
                          num_workers=self.workers, collate_fn=self.task.collate_fn(), drop_last=False)

    def val_loader(self):
        # The whole val set on every rank: every rank reports the same metric.
        return DataLoader(self.p.val_set, batch_size=self.config["batch_size"], shuffle=False,
                          num_workers=self.workers, collate_fn=self.task.collate_fn())

    def evaluate(self, model, loader) -> float:
        return float(self.task.evaluate(model, loader, self.device))

    # -- sub-commands --------------------------------------------------------------------
    def compressed(self):
        self.p.gm.to(self.device)
        return self.p.ctrl, self.p.gm

    def train(self, to_onnx=None) -> dict:
        config, log, main = self.config, self.log, self.processes.is_main
        train_loader, val_loader = self.train_loader(), self.val_loader()
        resume = self.p.resume
        self.p.model.to(self.device)
        fp32 = resume["fp32_metric"] if resume else self.evaluate(self.p.model, val_loader)
        log.line(f"fp32 {self.task.metric_name}: {fp32:.4f}")
        ctrl, gm = self.compressed()
        model = gm
        if self.processes.distributed:
            model = torch.nn.parallel.DistributedDataParallel(
                gm, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            ctrl.distributed()
        optimizer = make_optimizer(gm.parameters(), config["optimizer"])
        lr_scheduler = make_lr_scheduler(optimizer, config["optimizer"], config["epochs"])
        ctrl.scheduler.attach_optimizer(optimizer)  # staged quantization's learning-rate policy
        history = []
        if resume is None:
            self.sampler.set_epoch(0)
            self.initialize(ctrl, train_loader)
            start_epoch, best = 0, None
            metric = self.evaluate(gm, val_loader)
            log.line(f"compressed {self.task.metric_name} after initialization: {metric:.4f}")
        else:
            optimizer.load_state_dict(resume["optimizer"])
            lr_scheduler.load_state_dict(resume["lr_scheduler"])
            start_epoch, best, history = resume["epoch"] + 1, resume["best_metric"], list(resume["history"])
            set_rng_state(resume["rng"], self.device, owner="--resume")
            log.line(f"resumed from epoch {resume['epoch'] + 1} ({self.task.metric_name} {history[-1]['metric']:.4f})")
        criterion = self.task.criterion(config)
        metric = history[-1]["metric"] if history else metric
        for epoch in range(start_epoch, config["epochs"]):
            if epoch > 0:  # the level trained in an epoch is the level validated and saved with it
                ctrl.scheduler.epoch_step()
            self.sampler.set_epoch(epoch)
            started = time.perf_counter()
            loss = self.train_epoch(model, ctrl, optimizer, criterion, train_loader, epoch)
            # DDP keeps parameters in step, but each rank's last forward left its own BatchNorm
            # statistics: rank 0's go to every rank, so all validate and save the same model.
            broadcast_from_rank0(list(gm.buffers()))
            metric = self.evaluate(gm, val_loader)
            lr = optimizer.param_groups[0]["lr"]
            step_lr_scheduler(lr_scheduler, metric)
            statistics = ctrl.statistics()
            row = {"epoch": epoch + 1, "loss": loss, "metric": metric, "lr": lr,
                   "seconds": round(time.perf_counter() - started, 3), **compression_levels(ctrl)}
            history.append(row)
            fully = fully_compressed(ctrl)
            is_best = fully and (best is None or metric > best)
            best = metric if is_best else best
            log.epoch(row, statistics, self.task.metric_name, config["epochs"])
            if main:
                state = {"format": CHECKPOINT_FORMAT, "model": gm.state_dict(), "controller": ctrl.state_dict(),
                         "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                         "epoch": epoch, "rng": rng_state(self.device), "best_metric": best,
                         "metric": metric, "fp32_metric": fp32, "history": history,
                         "num_classes": self.p.num_classes, "config": json.loads(json.dumps(config))}
                log.checkpoint(state, is_best)
        if best is None and config["epochs"] > start_epoch:
            log.line("no best.pth: the compression schedules did not reach their targets in "
                     f"{config['epochs']} epochs (last.pth holds the last epoch)")
        metrics = self.gather(metric)
        result = {"fp32_metric": fp32, "metric": metric, "metric_name": self.task.metric_name,
                  "best_metric": best, "epochs": config["epochs"], "metric_per_rank": metrics,
                  "levels": compression_levels(ctrl)}
        log.finish(result, history)
        if to_onnx is not None and main:
            self.export(ctrl, gm, to_onnx)
        return result

    def train_epoch(self, model, ctrl, optimizer, criterion, loader, epoch) -> float:
        model.train()
        total, batches = 0.0, 0
        progress = self.log.progress(loader, f"epoch {epoch + 1}/{self.config['epochs']}")
        for images, targets in progress:
            images, targets = images.to(self.device), self.task.targets_to(targets, self.device)
            loss = criterion(model(images), targets)
            compression_loss = ctrl.loss()
            if compression_loss is not None:
                loss = loss + compression_loss
            loss.backward()
            if ctrl.scheduler.should_step_optimizer():  # staged quantization's batch_multiplier
                optimizer.step()
                optimizer.zero_grad()
            ctrl.scheduler.step()
            total, batches = total + loss.item(), batches + 1
            progress.set_postfix(loss=f"{total / batches:.4f}")
        return total / max(batches, 1)

    def gather(self, metric: float) -> list[float]:
        if not self.processes.distributed:
            return [metric]
        values = [None] * self.processes.world_size
        dist.all_gather_object(values, metric)
        return values

    def test(self) -> dict:
        val_loader = self.val_loader()
        self.p.model.to(self.device)
        fp32 = self.evaluate(self.p.model, val_loader)
        self.log.line(f"fp32 {self.task.metric_name}: {fp32:.4f}")
        ctrl, gm = self.compressed()
        if self.p.resume is None:
            self.sampler_free_initialize(ctrl)
        metric = self.evaluate(gm, val_loader)
        self.log.line(f"compressed {self.task.metric_name}: {metric:.4f}")
        self.log.line(str(ctrl.statistics()))
        return {"fp32_metric": fp32, "metric": metric, "metric_name": self.task.metric_name}

    def initialize(self, ctrl, loader):
        """ctrl.initialize; mixed precision (HAWQ) takes its Hessian traces of the task's loss
        (its default, cross-entropy, fits classification only)."""
        criterion = self.task.criterion(self.config)
        for part in ctrl.parts:
            if hasattr(part, "set_criterion"):
                part.set_criterion(criterion, lambda outputs, targets, loss: loss(
                    outputs, self.task.targets_to(targets, self.device)))
        ctrl.initialize(loader, device=self.device)

    def sampler_free_initialize(self, ctrl):
        """Initialize compression from the train set (no checkpoint given): post-training compression."""
        loader = DataLoader(self.p.train_set, batch_size=self.config["batch_size"], shuffle=False,
                            num_workers=self.workers, collate_fn=self.task.collate_fn())
        self.initialize(ctrl, loader)

    def export_only(self, path):
        ctrl, gm = self.compressed()
        if self.p.resume is None:
            self.sampler_free_initialize(ctrl)
        self.export(ctrl, gm, path)

    def export(self, ctrl, gm, path):
        """The lowered compressed model (as the task wants it exported) to ONNX at ``path``."""
        from fxcompress.export import export_onnx
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        gm.cpu()
        for part in ctrl.parts:
            part.check_exportable()
        module = self.task.export_module(ctrl.lower())
        export_onnx(module, path, example_inputs=(self.task.example_input(self.config),))
        gm.to(self.device)
        self.log.line(f"ONNX model written to {path}")


def _staged(part) -> bool:
    """A part whose schedule switches activations and weights on at start epochs (plain
    quantization has the same schedule object with no start epochs: always on, not staged)."""
    scheduler = getattr(part, "scheduler", None)
    return (getattr(scheduler, "activations_quant_start_epoch", None) is not None
            or getattr(scheduler, "weights_quant_start_epoch", None) is not None)


def compression_levels(ctrl) -> dict:
    """The current compression level of every scheduled part (sparsity, pruning ratio, ...); for a
    staged part (binarization, staged quantization) the share of its stages switched on (0, 0.5, 1)."""
    levels = {}
    for name, part in ctrl.items():
        level = getattr(getattr(part, "scheduler", None), "current_level", None)
        if _staged(part):
            level = (part.scheduler.activations_enabled + part.scheduler.weights_enabled) / 2
        if level is not None:
            levels[f"{name}_level"] = round(float(level), 6)
    return levels


def fully_compressed(ctrl) -> bool:
    """Every level schedule at its target and every staged part in its last stage."""
    from fxcompress.accuracy_aware import fully_compressed as levels_reached
    stages_done = all(part.scheduler.activations_enabled and part.scheduler.weights_enabled
                      for part in ctrl.parts if _staged(part))
    return levels_reached(ctrl) and stages_done
