"""Task names to their (lazily imported) Task classes, and the choice of task for a config."""
from __future__ import annotations

import importlib

from fxcompress.samples.task import SampleError, Task

# Imported on demand so that one task's optional dependencies never slow or break another.
TASKS = {
    "classification": "fxcompress.samples.classification:ClassificationTask",
    "segmentation": "fxcompress.samples.segmentation:SegmentationTask",
    "detection": "fxcompress.samples.detection:DetectionTask",
}


def load_task(name: str) -> Task:
    """An instance of the task called `name`; SampleError for an unknown one."""
    if name not in TASKS:
        raise SampleError(f"config key 'task': unknown task {name!r}; known: {', '.join(TASKS)}")
    module_name, class_name = TASKS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)()


def task_for_config(config: dict) -> Task:
    """config["task"] if given, else the task whose known_models() contains config["model"]
    (`timm:<name>` is always classification: timm's names are too many to list)."""
    if config.get("task") is not None:
        return load_task(config["task"])
    model = config.get("model")
    if isinstance(model, str) and model.startswith("timm:"):
        return load_task("classification")
    known = {}
    for name in TASKS:
        try:
            task = load_task(name)
        except ModuleNotFoundError as error:
            if error.name != TASKS[name].split(":")[0]:
                raise
            continue  # this task's module is not part of this build
        names = task.known_models()
        if model in names:
            return task
        known[name] = names
    listing = "; ".join(f"{task}: {', '.join(names[:12])}{', ...' if len(names) > 12 else ''}"
                        for task, names in known.items())
    raise SampleError(f"config key 'model': unknown model {model!r} (known models, {listing})")
