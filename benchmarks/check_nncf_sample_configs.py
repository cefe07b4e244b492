"""NNCF 2.5's classification sample configs, byte for byte, on torchvision models (sample size made small).

    python benchmarks/check_nncf_sample_configs.py CONFIG_DIR [NAME_FILTER]

CONFIG_DIR holds NNCF 2.5's ``examples/torch/classification/configs/**/*.json`` (e.g.
``git -C nncf archive v2.5.0 examples/torch/classification/configs | tar -x`` then flattened);
needs torchvision. Prints OK / REFUSED / CRASH per config and "N of M run unchanged"
(docs/nncf_configs.md).
"""
import sys, warnings, glob, os

from checkout import use_this_checkout  # noqa: E402  (benchmarks/checkout.py)

ROOT = use_this_checkout()
import json5, torch, torchvision
warnings.filterwarnings("ignore")
os.environ["TQDM_DISABLE"] = "1"
torch.set_num_threads(1)
from fxcompress import compile_for_compression, Config
from fxcompress.errors import FxCompressError
ok, refused, crashed = [], [], []
FIRST = ("manual", "learned_ranking")  # the configs this round changes run first
if len(sys.argv) < 2:
    sys.exit(__doc__)
CONFIG_DIR = sys.argv[1]
ONLY = sys.argv[2] if len(sys.argv) > 2 else ""
for path in sorted((p for p in glob.glob(os.path.join(CONFIG_DIR, "**", "*.json"), recursive=True) if ONLY in p), key=lambda p: (not any(k in p for k in FIRST), p)):
    name = os.path.basename(path)
    raw = json5.loads(open(path).read())
    arch = raw.get("model")
    if not hasattr(torchvision.models, str(arch)) or "compression" not in raw:
        continue
    size = 96 if arch in ("inception_v3", "googlenet") else 64
    try:
        cfg = Config.from_json(path)  # the file as NNCF ships it (comments, trailing commas)
        data = dict(cfg.data)
        info = data["input_info"]
        info = dict(info) if isinstance(info, dict) else dict(info[0])
        info["sample_size"] = [2, 3, size, size]
        data["input_info"] = info
        kwargs = {"num_classes": 10}
        if arch in ("inception_v3", "googlenet"):
            # transform_input as torchvision's pretrained=True (the samples' "pretrained": true) sets it
            kwargs.update(aux_logits=False, init_weights=False, **({"transform_input": True} if arch == "inception_v3" else {}))
        model = getattr(torchvision.models, arch)(**kwargs).eval()
        ctrl, gm = compile_for_compression(model, data)
        if "filter_pruning" in ctrl and ctrl.filter_pruning.learned_ranking:
            # LeGR's candidates are trained and scored by the user's callbacks (NNCF:
            # register_default_init_args(train_steps_fn=, val_fn=)); here one step each, on random data
            def train_steps_fn(loader, model, optimizer, ctrl_part, steps):
                model.train()
                for x, y in list(loader)[:1]:
                    optimizer.zero_grad(); torch.nn.functional.cross_entropy(model(x), y).backward(); optimizer.step()
            def val_fn(model, loader):
                model.eval()
                with torch.no_grad():
                    return 0.0, float(sum(torch.nn.functional.cross_entropy(model(x), y) for x, y in loader))
            ctrl.filter_pruning.set_legr_callbacks(train_steps_fn=train_steps_fn, val_fn=val_fn)
        batches = [(torch.randn(2, 3, size, size), torch.randint(0, 10, (2,))) for _ in range(2)]
        ctrl.initialize(batches)
        gm.train()
        out = gm(batches[0][0])
        out = out[0] if isinstance(out, tuple) else out
        (torch.nn.functional.cross_entropy(out, batches[0][1]) + ctrl.loss()).backward()
        ctrl.scheduler.step(); ctrl.scheduler.epoch_step()
        ok.append(name)
        extra = ""
        if "filter_pruning" in ctrl and ctrl.filter_pruning.learned_ranking:
            extra = str({k: v for k, v in ctrl.statistics()["filter_pruning"].summary.items() if "legr" in k or "flops_pruned" in k})
        if "mixed_precision" in ctrl and ctrl.mixed_precision.mode == "manual":
            extra = f"manual bits on {len(ctrl.mixed_precision.manual_assignments)} quantizers"
        print("OK     ", name, extra, flush=True)
    except FxCompressError as e:
        refused.append(name)
        print("REFUSED", name, type(e).__name__, str(e).splitlines()[0][:220], flush=True)
    except Exception as e:
        crashed.append(name)
        print("CRASH  ", name, type(e).__name__, str(e)[:300], flush=True)
total = len(ok) + len(refused) + len(crashed)
print(f"{len(ok)} of {total} run unchanged; {len(refused)} refused; {len(crashed)} crashed")
