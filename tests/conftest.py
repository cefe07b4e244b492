"""Shared test setup: hypothesis profiles and thread limits for a 2-core CI machine.

Profiles: "ci" (default, few examples, keeps `make test` under 10 minutes) and
"thorough" (opt in: HYPOTHESIS_PROFILE=thorough, or the `slow` marker's runs).
"""
import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "12")), deadline=None,
    derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "thorough", max_examples=200, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# One torch thread per pytest-xdist worker (`make test` runs two on the 2-core machine):
# oversubscribed threads made small-model steps 10x slower on a loaded machine.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


# Accuracy tests take a ``train_seed`` (data split, trained DigitsCNN, batch order, torch RNG): the
# seeds of their ``@pytest.mark.seeds(...)`` marker (default 0) in CI, or every seed listed in
# FXCOMPRESS_TEST_SEEDS (e.g. "0,1,2,3,4") to measure the spread their margins rest on
# (docs/testing.md, "Accuracy margins").
def pytest_configure(config):
    config.addinivalue_line("markers", "seeds(*seeds): the train_seed values an accuracy test runs with in CI")


def pytest_generate_tests(metafunc):
    if "train_seed" not in metafunc.fixturenames:
        return
    env = os.environ.get("FXCOMPRESS_TEST_SEEDS")
    marker = metafunc.definition.get_closest_marker("seeds")
    seeds = [int(s) for s in env.split(",")] if env else list(marker.args) if marker else [0]
    metafunc.parametrize("train_seed", seeds, ids=[f"seed{s}" for s in seeds])
