"""Two processes (gloo on 127.0.0.1), each initializing every algorithm on its own data:
after ``ctrl.distributed()`` (called before or after ``initialize()``) every compression
parameter and buffer, BatchNorm statistics included, and the controller state are
identical on both ranks; before it they differ (so the data really differ per rank).
One spawn runs every case, to keep the test in the default suite."""
import datetime
import os
import socket

import torch
import torch.multiprocessing as mp

from compression_cases import ALGORITHMS, CASES, batches, model_and_example
from fxcompress import compile_for_compression

ORDERS = ("distributed_then_initialize", "initialize_then_distributed")
WORLD = 2


def _state(ctrl, gm) -> dict:
    return {"graph": {k: v.detach().clone() for k, v in gm.state_dict().items()}, "controller": ctrl.state_dict()}


def _run_case(algorithm: str, order: str, rank: int) -> dict:
    torch.manual_seed(0)  # the same model and RNG on every rank: only the data differ
    model, example = model_and_example()
    ctrl, gm = compile_for_compression(model, CASES[algorithm](), example_inputs=example)
    data = batches(seed=10 + rank)
    if order == "distributed_then_initialize":
        ctrl.distributed()
        ctrl.initialize(data)
        return {"synchronized": _state(ctrl, gm)}
    ctrl.initialize(data)
    before = _state(ctrl, gm)
    ctrl.distributed()
    return {"rank_local": before, "synchronized": _state(ctrl, gm)}


def _worker(rank: int, port: int, directory: str):
    import warnings

    import torch.distributed as dist
    warnings.simplefilter("ignore")  # HAWQ's negative-trace warning on an untrained model
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        results = {(a, o): _run_case(a, o, rank) for a in ALGORITHMS for o in ORDERS}
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(directory, f"rank{rank}.pt"))


# Per-rank diagnostics in the controller state, not compression state: how this rank's own
# Hessian-trace estimate converged (its history, iterations, seconds) before the ranks averaged
# the traces the bits are chosen from (mixed precision's ``traces``, which are compared).
RANK_LOCAL_DIAGNOSTICS = ("/trace_estimate",)


def _differences(a, b, path=""):
    """Paths where two nested results differ (tensors compared bitwise, with dtype)."""
    if path.endswith(RANK_LOCAL_DIAGNOSTICS):
        return []
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [path]
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return [path]
        return [d for k in a for d in _differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return [path]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


def test_every_algorithm_initializes_identically_across_ranks_in_either_order(tmp_path, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")  # the workers inherit it: no progress bars from two processes
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for algorithm in ALGORITHMS:
        for order in ORDERS:
            diff = _differences(ranks[0][algorithm, order]["synchronized"], ranks[1][algorithm, order]["synchronized"])
            assert not diff, f"{algorithm} ({order}): ranks differ in {diff[:8]}"
        local = [ranks[r][algorithm, "initialize_then_distributed"]["rank_local"] for r in range(WORLD)]
        apart = _differences(*local)
        assert any(p.endswith("running_var") for p in apart), \
            f"{algorithm}: BatchNorm statistics agree before distributed(): the test would prove nothing"
        if algorithm not in ("magnitude_sparsity", "filter_pruning"):  # their masks come from the weights alone
            assert any("running" not in p for p in apart), f"{algorithm}: only BatchNorm statistics differed"
