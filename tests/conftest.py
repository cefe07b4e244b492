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
