"""Mixed precision, the parts that need no model: Hutchinson's estimator against the exact Hessian,
and the HAWQ-v2 selection on hypothesis-generated traces."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fxcompress.errors import ConfigError
from fxcompress.passes.mixed_precision import (estimate_average_traces, hessian_vector_products,
                                               monotone_configurations, select_bitwidths)
from fxcompress.passes.mixed_precision.selection import (bit_complexity, compression_ratio, effective_bits,
                                                         ratio_bounds)

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread avoids OpenMP oversubscription on the shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- Hutchinson against the exact Hessian -------------------------------------------------------------

def _tiny_problem(seed=0):
    """A 2-layer tanh MLP (5 -> 4 -> 3) on 24 samples: the Hessian (47 x 47) can be formed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 5, generator=g)
    y = torch.randint(0, 3, (24,), generator=g)
    w1 = (torch.randn(4, 5, generator=g) * 0.8).requires_grad_(True)
    w2 = (torch.randn(3, 4, generator=g) * 0.8).requires_grad_(True)

    def loss_of(a, b, xs=x, ys=y):
        return F.cross_entropy(torch.tanh(xs @ a.t()) @ b.t(), ys)

    return x, y, w1, w2, loss_of


def _exact_hessian(w1, w2, loss_of):
    h = torch.autograd.functional.hessian(lambda a, b: loss_of(a, b), (w1.detach(), w2.detach()))
    n1, n2 = w1.numel(), w2.numel()
    return [[h[i][j].reshape((n1, n2)[i], (n1, n2)[j]) for j in range(2)] for i in range(2)]


def test_hessian_vector_products_equal_the_exact_hessian_times_v():
    x, y, w1, w2, loss_of = _tiny_problem()
    H = _exact_hessian(w1, w2, loss_of)
    g = torch.Generator().manual_seed(1)
    v = [torch.randn(w1.shape, generator=g), torch.randn(w2.shape, generator=g)]
    (hv,) = hessian_vector_products(loss_of(w1, w2), [w1, w2], [v])
    flat = [t.reshape(-1) for t in v]
    for i in range(2):
        expected = H[i][0] @ flat[0] + H[i][1] @ flat[1]
        torch.testing.assert_close(hv[i].reshape(-1), expected, atol=1e-5, rtol=1e-4)


def test_hutchinson_estimate_matches_the_exact_average_trace():
    """Stated tolerance: 5 standard errors of the estimator, computed from the exact Hessian.

    For the joint Rademacher probe the single-probe estimate of block i has variance
    (2 * sum_{a != b} H_ii[a, b]^2 + sum_{j != i} ||H_ij||_F^2) / n_i^2; after K probes the
    standard error is sqrt(variance / K). With K = 2000 that is a few percent of the trace here.
    """
    x, y, w1, w2, loss_of = _tiny_problem()
    H = _exact_hessian(w1, w2, loss_of)
    sizes = [w1.numel(), w2.numel()]
    exact = [float(torch.diagonal(H[i][i]).sum()) / sizes[i] for i in range(2)]
    # two batches of unequal size: the estimator weights them by sample count
    batches = [(lambda: loss_of(w1, w2, x[:16], y[:16]), 16), (lambda: loss_of(w1, w2, x[16:], y[16:]), 8)]
    probes = 2000
    est = estimate_average_traces(batches, [w1, w2], iter_number=probes, tolerance=0.0, probes_per_pass=100,
                                  generator=torch.Generator().manual_seed(0))
    assert est.iterations == probes and not est.converged
    for i in range(2):
        off = H[i][i] - torch.diag(torch.diagonal(H[i][i]))
        var = 2 * float((off ** 2).sum()) + sum(float((H[i][j] ** 2).sum()) for j in range(2) if j != i)
        stderr = math.sqrt(var / probes) / sizes[i]
        assert abs(est.traces[i] - exact[i]) <= 5 * stderr + 1e-7, (i, est.traces[i], exact[i], stderr)
        assert abs(est.traces[i] - exact[i]) <= 0.1 * abs(exact[i])


def test_iterations_stop_at_the_tolerance_and_probe_batching_does_not_change_the_result():
    x, y, w1, w2, loss_of = _tiny_problem(seed=3)
    batches = [(lambda: loss_of(w1, w2), 24)]
    runs = [estimate_average_traces(batches, [w1, w2], iter_number=300, tolerance=1e-3, probes_per_pass=k,
                                    generator=torch.Generator().manual_seed(5)) for k in (1, 7)]
    assert runs[0].converged and 2 <= runs[0].iterations < 300
    assert runs[1].iterations == runs[0].iterations
    assert runs[1].traces == pytest.approx(runs[0].traces, rel=1e-5)
    # the stopping rule: relative change of the summed running mean below the tolerance
    means = [sum(map(sum, runs[0].history[:i])) / i for i in range(1, runs[0].iterations + 1)]
    assert abs(means[-1] - means[-2]) / (abs(means[-2]) + 1e-6) < 1e-3
    assert all(abs(b - a) / (abs(a) + 1e-6) >= 1e-3 for a, b in zip(means[:-2], means[1:-1]))


def test_estimator_input_errors():
    x, y, w1, w2, loss_of = _tiny_problem()
    with pytest.raises(ValueError, match="no data"):
        estimate_average_traces([], [w1])
    with pytest.raises(ValueError, match="does not require grad"):
        estimate_average_traces([(lambda: loss_of(w1, w2), 1)], [w1.detach()])
    unused = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="does not depend"):
        estimate_average_traces([(lambda: loss_of(w1, w2), 1)], [w1, unused], iter_number=1)


# -- selection -----------------------------------------------------------------------------------------

BIT_SETS = st.sampled_from([[2, 4, 8], [4, 8], [2, 8], [3, 5, 8], [2, 4, 6, 8], [4], [2, 3, 4]])


@st.composite
def problems(draw):
    n = draw(st.integers(1, 6))
    bits = draw(BIT_SETS)
    # few distinct trace values so that ties occur
    traces = draw(st.lists(st.sampled_from([0.0, 1e-4, 3e-3, 0.02, 0.5, 7.0]), min_size=n, max_size=n))
    flops = draw(st.lists(st.integers(1, 10_000), min_size=n, max_size=n))
    base = draw(st.lists(st.floats(1e-3, 1e3), min_size=n, max_size=n))
    # quantization noise shrinks about 4x per extra bit
    noise = [{b: c * 4.0 ** (-b) for b in bits} for c in base]
    groups = draw(st.one_of(st.none(), st.lists(st.one_of(st.none(), st.integers(0, 2)), min_size=n, max_size=n)))
    low, high = ratio_bounds(bits)
    target = draw(st.floats(low, high)) if high > low else low
    return traces, flops, noise, bits, target, groups


def _monotone(config, traces):
    """Bits never decrease along ascending traces, ties in execution order (NNCF's TracesOrder)."""
    order = sorted(range(len(traces)), key=lambda i: (traces[i], i))
    return all(config[a] <= config[b] for a, b in zip(order, order[1:]))


def _sensitivity(config, traces, noise):
    return sum(t * n[b] for t, n, b in zip(traces, noise, config))


@settings(deadline=None)
@given(problems())
def test_selection_meets_the_ratio_respects_the_trace_order_and_is_optimal(problem):
    traces, flops, noise, bits, target, groups = problem
    s = select_bitwidths(traces, flops, noise, bits, target, groups=groups)
    # the ratio: met, and reported as recomputed from the chosen bits
    assert s.compression_ratio >= target * (1 - 1e-9)
    assert s.compression_ratio == pytest.approx(compression_ratio(s.bits, flops, groups))
    # the trace order: a smaller trace never gets more bits
    for i, j in itertools.permutations(range(len(traces)), 2):
        if traces[i] < traces[j]:
            assert s.bits[i] <= s.bits[j]
    # activation bits: the max over each group's layers
    for g, b in s.activation_bits.items():
        assert b == max(s.bits[i] for i, gi in enumerate(groups) if gi == g)
    # optimal: no monotone candidate meeting the ratio has less total sensitivity (brute force)
    feasible = [c for c in itertools.product(sorted(bits), repeat=len(traces))
                if _monotone(c, traces) and compression_ratio(c, flops, groups) >= target * (1 - 1e-9)]
    assert s.num_feasible == len(feasible)
    best = min(_sensitivity(c, traces, noise) for c in feasible)
    assert s.sensitivity == pytest.approx(best, rel=1e-9, abs=1e-300)
    assert s.sensitivity == pytest.approx(_sensitivity(s.bits, traces, noise), rel=1e-9, abs=1e-300)


@settings(deadline=None)
@given(st.lists(st.floats(0, 10), min_size=1, max_size=5), BIT_SETS)
def test_candidates_are_exactly_the_monotone_configurations(traces, bits):
    candidates = monotone_configurations(traces, bits)
    brute = {c for c in itertools.product(sorted(bits), repeat=len(traces)) if _monotone(c, traces)}
    assert set(candidates) == brute and len(set(candidates)) == len(candidates)
    assert len(candidates) == math.comb(len(traces) + len(set(bits)) - 1, len(set(bits)) - 1)
    # the constraint of the issue: a strictly smaller trace never gets more bits
    for c in candidates:
        assert all(c[i] <= c[j] for i, j in itertools.permutations(range(len(c)), 2) if traces[i] < traces[j])


@settings(deadline=None)
@given(problems(), st.sampled_from(["above", "below"]))
def test_unreachable_ratio_is_a_config_error_with_the_reachable_range(problem, side):
    traces, flops, noise, bits, _, groups = problem
    low, high = ratio_bounds(bits)
    target = high * 1.01 if side == "above" else low * 0.99
    with pytest.raises(ConfigError, match=r"reachable range is \[") as info:
        select_bitwidths(traces, flops, noise, bits, target, groups=groups)
    assert f"{low:.4g}" in str(info.value) and f"{high:.4g}" in str(info.value)
    assert info.value.path == "compression_ratio"


def test_bit_complexity_counts_the_max_of_weight_and_shared_activation_bits():
    flops = [10, 20, 30]
    # layers 0 and 1 share an activation quantizer: it gets 8 bits, so layer 1 costs 8 bits too
    assert effective_bits([8, 4, 2], groups=["a", "a", None]) == [8, 8, 2]
    assert bit_complexity([8, 4, 2], flops, ["a", "a", None]) == 10 * 8 + 20 * 8 + 30 * 2
    assert compression_ratio([4, 4, 4], flops) == 2.0
    assert compression_ratio([8, 8, 8], flops) == 1.0


def test_fixed_layers_count_in_the_ratio_and_strict_mode_keeps_groups_uniform():
    traces, flops = [1.0, 2.0, 3.0], [100, 100, 100]
    noise = [{b: 4.0 ** -b for b in (4, 8)} for _ in traces]
    # layer 2 fixed at 8 bits: at most (8*300)/(4*200+8*100) = 1.5 is reachable
    s = select_bitwidths(traces, flops, noise, [4, 8], 1.5, fixed={2: 8})
    assert s.bits == [4, 4, 8] and s.compression_ratio == pytest.approx(1.5)
    with pytest.raises(ConfigError, match=r"\[1, 1.5\]"):
        select_bitwidths(traces, flops, noise, [4, 8], 1.6, fixed={2: 8})
    # strict: layers 0 and 2 share an activation quantizer, so they get equal weight bits
    s = select_bitwidths(traces, flops, noise, [4, 8], 1.2, groups=["g", None, "g"], strict=True)
    assert s.bits[0] == s.bits[2]


def test_ties_go_to_the_higher_ratio():
    # zero traces: every candidate has sensitivity 0; the most compressed one wins
    s = select_bitwidths([0.0, 0.0], [1, 1], [{4: 1.0, 8: 0.1}] * 2, [4, 8], 1.0)
    assert s.bits == [4, 4] and s.compression_ratio == 2.0
