"""The op library (fxcompress.ops): compiled kernels against the pure-PyTorch
reference, the reference against independent formulas, gradients, argument
errors, torch.library registration and tracing.

Compiled kernels are reached through ``torch.ops.fxcompress.*`` (the CPU
kernels of the loaded library); the reference through
``fxcompress.ops.reference``. Tests marked ``requires_compiled`` are skipped
when the library is not built (tests/test_ops_build.py says why).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fxcompress.ops as ops
from fxcompress.ops import reference

F = torch.ops.fxcompress
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

requires_compiled = pytest.mark.skipif(ops.backend() == "reference",
                                       reason="the compiled op library is not built (see test_ops_build.py)")

# The CPU kernels are compiled once per instruction set (CMakeLists.txt) and picked at run time:
# tests of the compiled ops run on each one, switched in process with _set_cpu_isa.
CPU_ISAS = ["avx512", "avx2", "baseline"]


def cpu_isa_params():
    """One pytest param per CPU instruction set, skipped with the reason where the library or this CPU
    lacks it. With the reference backend one param, None: the tests then check the reference kernels
    (which the ops run), and those marked requires_compiled skip."""
    if ops.backend() == "reference":
        return [pytest.param(None, id="reference-kernels")]
    compiled = ops.backend_info()["build"]["cpu_isas"].split(",")
    supported = F._cpu_isas_supported().split(",")
    params = []
    for isa in CPU_ISAS:
        reason = (None if isa in supported else
                  f"the library has no {isa} kernels (compiled: {','.join(compiled)})" if isa not in compiled else
                  f"this CPU (or its OS) cannot run the {isa} kernels (it can run: {','.join(supported)})")
        params.append(pytest.param(isa, marks=[pytest.mark.skip(reason=reason)] if reason else []))
    return params


on_each_cpu_isa = pytest.mark.parametrize("isa", cpu_isa_params())


@contextlib.contextmanager
def cpu_isa(isa: Optional[str]):
    """Runs the compiled CPU ops on the kernels of `isa` (None: leave them as they are)."""
    if isa is None:
        yield
        return
    previous = F._set_cpu_isa(isa)
    try:
        assert F._cpu_isa() == isa
        yield
    finally:
        F._set_cpu_isa(previous)


def assert_equal(actual, expected):
    """Bit-exact (NaN equals NaN), same dtype and shape."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def qrange(bits: int, kind: str) -> tuple[int, int]:
    if kind == "signed":
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if kind == "narrow":  # symmetric signed range, as for weights
        return -(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


# ---------------------------------------------------------------------------
# fake_quantize cases

@dataclass
class FQCase:
    shape: tuple
    axis: Optional[int]
    dtype: torch.dtype
    quant_min: int
    quant_max: int
    seed: int
    pow2_scale: bool
    broadcast_params: bool
    ties: bool = True  # x on exact ties (k + 0.5) * scale

    def tensors(self):
        """x, scale, zero_point, grad. x hits the grid: integer steps, exact ties
        (k + 0.5) * scale, values at and beyond both range edges, zeros and -0."""
        g = torch.Generator().manual_seed(self.seed)
        ndim = len(self.shape)
        ax = None if self.axis is None else self.axis % ndim
        channels = 1 if ax is None else self.shape[ax]
        if self.pow2_scale:  # x / scale and (k + 0.5) * scale are exact
            scale = 2.0 ** torch.randint(-6, 2, (channels,), generator=g).float()
        else:
            scale = torch.rand(channels, generator=g) * 0.5 + 1e-3
        # Zero points: integers, halves (rounded to even) and beyond the range (clamped).
        zero_point = (torch.randint(self.quant_min - 2, self.quant_max + 3, (channels,), generator=g).float()
                      + torch.tensor([0.0, 0.5, 0.25])[torch.randint(0, 3, (channels,), generator=g)])
        zp_rounded = torch.round(zero_point).clamp(self.quant_min, self.quant_max)
        pshape = [1] * ndim
        if ax is not None:
            pshape[ax] = channels
        s_b, zp_b = scale.reshape(pshape), zp_rounded.reshape(pshape)
        k = torch.randint(self.quant_min - 4, self.quant_max + 5, self.shape, generator=g).float()
        fracs = [0.0, 0.5, -0.5, 0.3] if self.ties else [0.0, 0.4, -0.3, 0.3]
        frac = torch.tensor(fracs)[torch.randint(0, 4, self.shape, generator=g)]
        x = (k - zp_b + frac) * s_b
        special = torch.tensor([0.0, -0.0, 1e4, -1e4])[torch.randint(0, 4, self.shape, generator=g)]
        x = torch.where(torch.rand(self.shape, generator=g) < 0.1, special, x).to(self.dtype)
        grad = torch.randn(self.shape, generator=g).to(self.dtype)
        if self.broadcast_params:
            scale, zero_point = scale.reshape(pshape), zero_point.reshape(pshape)
        elif ax is None and torch.rand((), generator=g) < 0.5:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        return x, scale, zero_point, grad

    @property
    def args(self):
        return self.quant_min, self.quant_max, self.axis


@st.composite
def fq_cases(draw, max_dim=4, max_size=6):
    ndim = draw(st.integers(0, max_dim))
    shape = tuple(draw(st.lists(st.integers(1, max_size), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1)) if ndim and draw(st.booleans()) else None
    bits = draw(st.integers(2, 8))
    quant_min, quant_max = qrange(bits, draw(st.sampled_from(["signed", "unsigned", "narrow"])))
    return FQCase(shape, axis, draw(st.sampled_from(DTYPES)), quant_min, quant_max,
                  draw(st.integers(0, 2 ** 31 - 1)), draw(st.booleans()), draw(st.booleans()))


def grad_tolerance(grad, x, scale, zero_point, quant_min, quant_max):
    """Absolute tolerance for summed parameter gradients: float32 rounding of
    sums of |grad| * |d| with |d| <= max(|qmin - zp|, |qmax - zp|, s)."""
    d_max = max(abs(quant_min) + abs(float(zero_point.abs().max())) + 1, abs(quant_max) + 1,
                float(scale.max()))
    return 2e-6 * float(grad.float().abs().sum()) * d_max + 1e-6


def check_fake_quantize_backward(grads, expected, case_tensors, args):
    x, scale, zero_point, grad = case_tensors
    assert_equal(grads[0], expected[0])  # grad_x is a select: exact
    atol = grad_tolerance(grad, x, scale, zero_point, args[0], args[1])
    for got, want, like in zip(grads[1:], expected[1:], (scale, zero_point)):
        assert got.shape == like.shape and got.dtype == like.dtype
        torch.testing.assert_close(got, want, rtol=1e-5, atol=atol)


def check_fake_quantize_against_reference(case: FQCase, isa: Optional[str]):
    x, scale, zero_point, grad = tensors = case.tensors()
    with cpu_isa(isa):
        y = F.fake_quantize(x, scale, zero_point, *case.args)
        grads = F.fake_quantize_backward(grad, x, scale, zero_point, *case.args)
    assert_equal(y, reference.fake_quantize(x, scale, zero_point, *case.args))
    check_fake_quantize_backward(grads, reference.fake_quantize_backward(grad, x, scale, zero_point, *case.args),
                                 tensors, case.args)


@requires_compiled
@on_each_cpu_isa
@settings(deadline=None)
@given(case=fq_cases())
def test_fake_quantize_compiled_matches_reference(isa, case):
    check_fake_quantize_against_reference(case, isa)


@requires_compiled
@pytest.mark.parametrize("shape,axis,dtype", [((300_001,), None, torch.float32), ((3, 70_001), 0, torch.float16),
                                              ((5, 40_000), 1, torch.bfloat16), ((2, 600, 300), -1, torch.float32),
                                              ((70, 3, 1000), 1, torch.float16)])
@on_each_cpu_isa
def test_fake_quantize_large_tensors_many_tiles(isa, shape, axis, dtype):
    # Several tiles per channel, channel blocks, the inner == 1 path and threads.
    check_fake_quantize_against_reference(
        FQCase(shape, axis, dtype, -128, 127, seed=7, pow2_scale=False, broadcast_params=False), isa)


@requires_compiled
@on_each_cpu_isa
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 15, 16, 17, 31, 33, 47, 1023, 1025, 2063])
def test_fake_quantize_vector_tails(isa, n, dtype):
    """Runs whose length is not a multiple of the vector width (8 floats with AVX2 and AVX-512, 4 with
    SSE2; 16 in a 512-bit build) or of the 1024-element sub-blocks of the backward's sums: per tensor
    (one run of n), per channel with one element per channel (the inner == 1 row loop, the channel
    varying per element) and along the first axis (runs of n)."""
    for shape, axis in (((n,), None), ((3, n), -1), ((n, 1), 0), ((2, n), 0)):
        check_fake_quantize_against_reference(
            FQCase(shape, axis, dtype, -8, 7, seed=n, pow2_scale=n % 2 == 1, broadcast_params=False), isa)


@given(case=fq_cases(), needs=st.sampled_from(["all", "x", "scale", "params"]))
def test_fake_quantize_autograd_and_compile_decomposition_match_the_backward_op(case, needs):
    """Autograd of the op (the library's C++ formula, or the Python one of the fallback) and the
    ATen-op version torch.compile uses (fxcompress.ops.decomposed) against the backward op: the
    forward bit-exact, grad_x exact, scale / zero point gradients within float rounding; only the
    inputs that require grad get one."""
    x, scale, zero_point, grad = case.tensors()
    wants_grad = {"all": (True, True, True), "x": (True, False, False), "scale": (False, True, False),
                  "params": (False, True, True)}[needs]
    inputs = [t.clone().requires_grad_(w) for t, w in zip((x, scale, zero_point), wants_grad)]
    want_y = F.fake_quantize(x, scale, zero_point, *case.args)
    want = F.fake_quantize_backward(grad, x, scale, zero_point, *case.args)
    for fake_quantize in (F.fake_quantize, ops.decomposed.fake_quantize):
        y = fake_quantize(*inputs, *case.args)
        assert_equal(y.detach(), want_y)
        grads = torch.autograd.grad(y, [t for t in inputs if t.requires_grad], grad)
        expected = [g for g, w in zip(want, wants_grad) if w]
        assert len(grads) == len(expected)
        if wants_grad[0]:
            assert_equal(grads[0], expected[0])
        atol = grad_tolerance(grad, x, scale, zero_point, *case.args[:2])
        for got, exp in zip(grads[int(wants_grad[0]):], expected[int(wants_grad[0]):]):
            assert got.shape == exp.shape and got.dtype == exp.dtype
            torch.testing.assert_close(got, exp, rtol=1e-5, atol=atol)


# ---------------------------------------------------------------------------
# fake_quantize_learnable: fake_quantize at max(|scale|, min_scale), FakeQuantizer's forward

MIN_SCALE = 1e-8  # FakeQuantizer's floor (fxcompress.quantizers._MIN_SCALE)


def learnable_case(case):
    """x, scale, zero_point, grad of ``case`` with the scale's signs flipped at random and some
    entries at 0, -0, below, at and just above the floor (where abs / clamp_min have corners)."""
    x, scale, zero_point, grad = case.tensors()
    g = torch.Generator().manual_seed(case.seed + 1)
    sign = torch.where(torch.rand(scale.shape, generator=g) < 0.5, -1.0, 1.0)
    corners = torch.tensor([0.0, -0.0, 1e-9, -1e-9, MIN_SCALE, -MIN_SCALE, 3e-8])
    corner = corners[torch.randint(0, len(corners), scale.shape, generator=g)]
    raw = torch.where(torch.rand(scale.shape, generator=g) < 0.2, corner, scale * sign)
    return x, raw, zero_point, grad


@settings(deadline=None)
@given(case=fq_cases(), needs=st.sampled_from(["all", "x", "scale", "params"]))
def test_fake_quantize_learnable_equals_fake_quantize_at_abs_scale_bit_for_bit(case, needs):
    """The op (and FakeQuantizer's wrapper) against what FakeQuantizer computed before it:
    ``fake_quantize(x, scale.abs().clamp_min(1e-8))`` with autograd through abs and clamp_min. Same
    forward, and the same gradients for x, scale and zero point, bit for bit (also at scales of 0,
    -0 and below or at the floor); only the inputs that require grad get one."""
    x, raw, zero_point, grad = learnable_case(case)
    wants_grad = {"all": (True, True, True), "x": (True, False, False), "scale": (False, True, False),
                  "params": (False, True, True)}[needs]

    def run(fn):
        inputs = [t.clone().requires_grad_(w) for t, w in zip((x, raw, zero_point), wants_grad)]
        y = fn(*inputs)
        return y.detach(), torch.autograd.grad(y, [t for t in inputs if t.requires_grad], grad)

    want_y, want = run(lambda x, s, zp: F.fake_quantize(x, s.abs().clamp_min(MIN_SCALE), zp, *case.args))
    for fn in (lambda x, s, zp: F.fake_quantize_learnable(x, s, zp, *case.args, MIN_SCALE),
               lambda x, s, zp: ops.fake_quantize_learnable_unchecked(x, s, zp, *case.args, MIN_SCALE)):
        y, grads = run(fn)
        assert_equal(y, want_y)
        assert len(grads) == len(want) == sum(wants_grad)
        for got, exp in zip(grads, want):
            assert_equal(got, exp)


@settings(deadline=None)
@given(fq_cases())
def test_fake_quantize_learnable_matches_reference(case):
    """The backend's op pair against the reference's definition (reference.py): forward bit-exact,
    grad_x exact, parameter gradients within float rounding."""
    x, raw, zero_point, grad = learnable_case(case)
    assert_equal(F.fake_quantize_learnable(x, raw, zero_point, *case.args, MIN_SCALE),
                 reference.fake_quantize_learnable(x, raw, zero_point, *case.args, MIN_SCALE))
    got = F.fake_quantize_learnable_backward(grad, x, raw, zero_point, *case.args, MIN_SCALE)
    want = reference.fake_quantize_learnable_backward(grad, x, raw, zero_point, *case.args, MIN_SCALE)
    check_fake_quantize_backward(got, want, (x, raw.abs().clamp_min(MIN_SCALE), zero_point, grad), case.args)
    # Independently of fake_quantize_learnable_backward: the raw scale's gradient is the clamped
    # one's, zero where |scale| is below the floor, with the scale's sign.
    at_abs = reference.fake_quantize_backward(grad, x, raw.abs().clamp_min(MIN_SCALE), zero_point, *case.args)
    kept = raw.abs() >= MIN_SCALE
    assert_equal(want[1], torch.where(kept, at_abs[1], 0.0) * torch.sign(raw))
    assert_equal(want[0], at_abs[0])
    assert_equal(want[2], at_abs[2])


@requires_compiled
@on_each_cpu_isa
@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced", "expanded_grad"])
def test_fake_quantize_non_contiguous_inputs(isa, layout):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 5, 7, generator=g)
    grad = torch.randn(4, 6, 5, 7, generator=g)
    if layout == "transposed":
        x, grad = x.transpose(1, 3), grad.transpose(1, 3)
    elif layout == "channels_last":
        x, grad = x.to(memory_format=torch.channels_last), grad.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x, grad = x[:, :, ::2], grad[:, :, ::2]
    else:
        grad = torch.ones(()).expand_as(x)
    scale, zero_point = torch.rand(x.shape[1], generator=g) * 0.1 + 0.01, torch.zeros(x.shape[1])
    args = (scale, zero_point, -8, 7, 1)
    with cpu_isa(isa):
        y = F.fake_quantize(x, *args)
        got = F.fake_quantize_backward(grad, x, *args)
    assert y.stride() == torch.empty_like(x).stride()
    assert_equal(y, reference.fake_quantize(x, *args))
    want = reference.fake_quantize_backward(grad, x, *args)
    assert got[0].stride() == torch.empty_like(x).stride()
    check_fake_quantize_backward(got, want, (x, scale, zero_point, grad), (-8, 7))


def test_fake_quantize_empty_and_zero_dim():
    for x, axis, n in [(torch.empty(0, 3), 1, 3), (torch.empty(3, 0), 0, 3), (torch.tensor(0.7), None, 1)]:
        scale, zero_point = torch.full((n,), 0.25), torch.zeros(n)
        for impl in (F.fake_quantize, reference.fake_quantize):
            assert_equal(impl(x, scale, zero_point, -8, 7, axis), reference.fake_quantize(x, scale, zero_point,
                                                                                         -8, 7, axis))
        grads = F.fake_quantize_backward(torch.ones_like(x), x, scale, zero_point, -8, 7, axis)
        assert [g.shape for g in grads] == [x.shape, scale.shape, zero_point.shape]


# ---------------------------------------------------------------------------
# The reference against independent formulas

@settings(deadline=None)
@given(fq_cases(max_dim=3), st.booleans())
def test_reference_equals_torch_fake_quantize_for_8_bit(case, signed):
    # torch.fake_quantize_per_{tensor,channel}_affine compute round(x * (1/s)):
    # with power-of-two scales that equals x / s, and integer zero points in range
    # need no rounding, so the conventions match exactly.
    quant_min, quant_max = qrange(8, "signed" if signed else "unsigned")
    case.dtype, case.pow2_scale, case.broadcast_params = torch.float32, True, False
    case.quant_min, case.quant_max = quant_min, quant_max
    x, scale, zero_point, _ = case.tensors()
    zero_point = torch.round(zero_point).clamp(quant_min, quant_max)
    ours = reference.fake_quantize(x, scale, zero_point, quant_min, quant_max, case.axis)
    if case.axis is None:
        theirs = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), quant_min, quant_max)
    else:
        theirs = torch.fake_quantize_per_channel_affine(x, scale.reshape(-1), zero_point.reshape(-1).int(),
                                                        case.axis % x.dim(), quant_min, quant_max)
    assert_equal(ours, theirs)


def test_rounding_is_half_to_even():
    k = torch.arange(-6, 6, dtype=torch.float32)
    x = (k + 0.5) * 0.25  # exact ties
    one = torch.ones(1)
    for impl in (reference.fake_quantize, F.fake_quantize):
        q = impl(x, one * 0.25, one * 0, -100, 100) / 0.25
        assert_equal(q, torch.round(k + 0.5))
        assert q.tolist()[4:8] == [-2.0, -0.0, 0.0, 2.0]  # -1.5, -0.5, 0.5, 1.5
    # the zero point too: 2.5 rounds to 2, 3.5 to 4
    for zp, expected in ((2.5, 2.0), (3.5, 4.0), (-0.5, -0.0)):
        y = F.fake_quantize(torch.zeros(1), one, one * zp, -10, 10)
        assert float(y) == 0.0
        y = F.fake_quantize(torch.full((1,), -20.0), one, one * zp, -10, 10)  # clamped: (qmin - zp) * s
        assert float(y) == -10.0 - expected


@settings(deadline=None)
@given(fq_cases(max_dim=3))
def test_gradients_match_torch_learnable_fake_quantize(case):
    # PyTorch's learnable fake quantize (grad_factor 1) has the same gradient
    # conventions; power-of-two scales make its x * (1/s) equal to x / s.
    case.dtype, case.pow2_scale, case.broadcast_params = torch.float32, True, False
    # PyTorch quirks kept out: its per-channel kernel returns a 0-d scale
    # gradient for a 1-d x or a single channel; its per-tensor backward rounds the zero point as
    # int(zp + 0.5), unlike its forward for negative ones; and its backward
    # rounds ties away from zero where its forward rounds them to even. (Ties
    # are checked against the reference and torch.round above.)
    assume(case.axis is None or (len(case.shape) > 1 and case.shape[case.axis] > 1))
    case.ties = False
    x, scale, zero_point, grad = case.tensors()
    zero_point = torch.round(zero_point).clamp(max(case.quant_min, 0), case.quant_max)
    x_t, s_t, z_t = (t.clone().reshape(-1 if t is not x else x.shape).requires_grad_()
                     for t in (x, scale, zero_point))
    if case.axis is None:
        y = torch._fake_quantize_learnable_per_tensor_affine(x_t, s_t, z_t, case.quant_min, case.quant_max, 1.0)
    else:
        y = torch._fake_quantize_learnable_per_channel_affine(x_t, s_t, z_t, case.axis % x.dim(),
                                                              case.quant_min, case.quant_max, 1.0)
    y.backward(grad)
    x_o, s_o, z_o = (t.clone().requires_grad_() for t in (x, scale, zero_point))
    y_o = ops.fake_quantize(x_o, s_o, z_o, *case.args)
    y_o.backward(grad)
    assert_equal(y_o, y.detach())
    assert_equal(x_o.grad, x_t.grad)
    atol = grad_tolerance(grad, x, scale, zero_point, case.quant_min, case.quant_max)
    torch.testing.assert_close(s_o.grad.reshape(-1), s_t.grad.reshape(-1), rtol=1e-5, atol=atol)
    torch.testing.assert_close(z_o.grad.reshape(-1), z_t.grad.reshape(-1), rtol=1e-5, atol=atol)


def _outside_and_inside_inputs(channels=3, per_channel=40, margin=2):
    """Per-channel x whose elements sit at least `margin` steps inside the
    range or beyond it, so a small change of scale or a unit change of the zero
    point never moves an element across a range edge."""
    g = torch.Generator().manual_seed(3)
    quant_min, quant_max = -8, 7
    scale = torch.tensor([0.5, 0.25, 0.125])[:channels]
    zero_point = torch.tensor([1.0, -2.0, 0.0])[:channels]
    inside = torch.randint(quant_min + margin, quant_max - margin + 1, (channels, per_channel), generator=g)
    below = torch.randint(quant_min - 40, quant_min - margin, (channels, per_channel), generator=g)
    above = torch.randint(quant_max + margin + 1, quant_max + 40, (channels, per_channel), generator=g)
    pick = torch.randint(0, 3, (channels, per_channel), generator=g)
    q = torch.where(pick == 0, inside, torch.where(pick == 1, below, above)).float()
    x = (q - zero_point[:, None] + 0.3) * scale[:, None]
    return x, scale, zero_point, quant_min, quant_max, (pick != 0)


def test_scale_gradient_matches_finite_differences_where_smooth():
    # Beyond the range the output (q_edge - zp) * s is linear in s, so the
    # straight-through gradient there is a true derivative: compare it with
    # central differences. (Inside the range the estimator's r - x/s is not a
    # derivative of round(x/s) * s; it is checked against PyTorch's learnable
    # fake quantize above.)
    x, scale, zero_point, quant_min, quant_max, outside = _outside_and_inside_inputs()
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)) * outside

    def loss(s):
        return float((ops.fake_quantize(x, s, zero_point, quant_min, quant_max, 0).double() * weights).sum())

    s = scale.clone().requires_grad_()
    (ops.fake_quantize(x, s, zero_point, quant_min, quant_max, 0) * weights).sum().backward()
    for c in range(len(scale)):
        h = 1e-3 * float(scale[c])
        plus, minus = scale.clone(), scale.clone()
        plus[c] += h
        minus[c] -= h
        numeric = (loss(plus) - loss(minus)) / (float(plus[c]) - float(minus[c]))
        assert s.grad[c].item() == pytest.approx(numeric, rel=1e-3, abs=1e-4)


def test_zero_point_gradient_matches_unit_step_differences():
    # The zero point is rounded, so its true derivative is 0 almost everywhere;
    # the straight-through gradient (-s beyond the range, 0 inside) is exactly
    # the change of the output for a unit step of an integer zero point.
    x, scale, zero_point, quant_min, quant_max, _ = _outside_and_inside_inputs()
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))

    def loss(zp):
        return float((ops.fake_quantize(x, scale, zp, quant_min, quant_max, 0).double() * weights).sum())

    z = zero_point.clone().requires_grad_()
    (ops.fake_quantize(x, scale, z, quant_min, quant_max, 0) * weights).sum().backward()
    for c in range(len(scale)):
        step = zero_point.clone()
        step[c] += 1
        assert z.grad[c].item() == pytest.approx(loss(step) - loss(zero_point), rel=1e-5, abs=1e-5)


# ---------------------------------------------------------------------------
# Binarization

@st.composite
def weights(draw, min_dim=1):
    ndim = draw(st.integers(min_dim, 4))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    w = torch.randn(shape, generator=g) * draw(st.sampled_from([1e-3, 1.0, 50.0]))
    w = torch.where(torch.rand(shape, generator=g) < 0.15, torch.zeros(()), w)  # sign(0) = +1
    return w.to(draw(st.sampled_from(DTYPES)))


def xnor_formula(w):
    """Written out: sign(w) (with sign(0) = +1) times mean |w| per output channel."""
    dims = tuple(range(1, w.dim()))
    mean = w.double().abs().mean(dim=dims, keepdim=True) if dims else w.double().abs()
    sign = torch.where(w >= 0, 1.0, -1.0).double()
    return (sign * mean.float().double()).to(w.dtype)


@on_each_cpu_isa
@settings(deadline=None)
@given(w=weights())
def test_weight_binarization(isa, w):
    for op, impl in ((F.xnor_binarize, reference.xnor_binarize), (F.dorefa_binarize, reference.dorefa_binarize)):
        with cpu_isa(isa):
            out = op(w)
        assert_equal(out, impl(w))
        assert out.dtype == w.dtype and out.shape == w.shape
        assert bool((out.float() >= 0).eq(w.float() >= 0).all())  # sign(0) = +1, binary: +-mean
    assert_equal(reference.xnor_binarize(w), xnor_formula(w))
    assert_equal(reference.dorefa_binarize(w),
                 (torch.where(w >= 0, 1.0, -1.0).double() * w.double().abs().mean().float().double()).to(w.dtype))
    per_channel = F.xnor_binarize(w).float().abs().reshape(w.shape[0], -1)
    assert bool((per_channel == per_channel[:, :1]).all())


def test_weight_binarization_is_straight_through():
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    grad = torch.randn(4, 3, 3, 3)
    for fn in (ops.xnor_binarize, ops.dorefa_binarize):
        w.grad = None
        fn(w).backward(grad)
        assert_equal(w.grad, grad)


@dataclass
class ActCase:
    shape: tuple
    per_channel: bool
    dtype: torch.dtype
    seed: int

    def tensors(self):
        g = torch.Generator().manual_seed(self.seed)
        channels = self.shape[1]
        scale = torch.rand(1, generator=g) * 2 + 0.1
        threshold = torch.rand(channels if self.per_channel else 1, generator=g)
        threshold_shape = [1] * len(self.shape)
        threshold_shape[1] = threshold.numel()
        threshold = threshold.reshape(threshold_shape)
        x = torch.randn(self.shape, generator=g) * float(scale)
        # the band edges 0 and s, and the threshold itself
        edges = torch.stack([torch.zeros(()), scale[0], scale[0] * threshold.reshape(-1)[0]])
        x = torch.where(torch.rand(self.shape, generator=g) < 0.1,
                        edges[torch.randint(0, 3, self.shape, generator=g)], x).to(self.dtype)
        grad = torch.randn(self.shape, generator=g).to(self.dtype)
        return x, scale, threshold, grad


@st.composite
def act_cases(draw):
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    return ActCase(shape, draw(st.booleans()), draw(st.sampled_from(DTYPES)), draw(st.integers(0, 2 ** 31 - 1)))


def nncf_activation_binarize(x, scale, threshold):
    """NNCF's ActivationBinarizationScaleThresholdFn, transcribed (float32)."""
    x, scale, threshold = x.float(), scale.float(), threshold.float()
    shape = [1] * x.dim()
    shape[1] = threshold.numel()
    output = (x > (threshold.reshape(-1) * scale).reshape(shape)).float() * scale

    def backward(grad_output):
        grad_output = grad_output.float()
        mask_lower = (x <= scale).float()
        grad_input = grad_output * (x >= 0).float() * mask_lower
        err = (output - x) / scale
        grad_scale = (grad_output * (mask_lower * err + (1 - mask_lower))).sum()
        grad_threshold = -grad_output * (x > 0).float() * (x < scale).float()
        for idx in range(x.dim()):
            if idx != 1:
                grad_threshold = grad_threshold.sum(idx, keepdim=True)
        if threshold.numel() == 1:  # one threshold shared by all channels (NNCF has one per channel)
            grad_threshold = grad_threshold.sum()
        return grad_input, grad_scale, grad_threshold

    return output, backward


@on_each_cpu_isa
@settings(deadline=None)
@given(case=act_cases())
def test_activation_binarization(isa, case):
    x, scale, threshold, grad = case.tensors()
    out = reference.activation_binarize(x, scale, threshold)
    nncf_out, nncf_backward = nncf_activation_binarize(x, scale, threshold)
    assert_equal(out, nncf_out.to(x.dtype))
    expected = reference.activation_binarize_backward(grad, x, scale, threshold)
    for got, want in zip(expected, nncf_backward(grad)):
        torch.testing.assert_close(got.float().reshape(-1), want.reshape(-1), rtol=1e-5,
                                   atol=1e-5 * (float(grad.float().abs().sum()) + 1))
    if ops.backend() != "reference":
        with cpu_isa(isa):
            assert_equal(F.activation_binarize(x, scale, threshold), out)
            got = F.activation_binarize_backward(grad, x, scale, threshold)
        assert_equal(got[0], expected[0])
        for g, e in zip(got[1:], expected[1:]):
            assert g.shape == e.shape and g.dtype == e.dtype
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * (float(grad.float().abs().sum()) + 1))


@on_each_cpu_isa
def test_activation_binarization_autograd_and_large_input(isa):
    case = ActCase((8, 16, 40, 40), True, torch.float32, seed=1)
    x, scale, threshold, grad = case.tensors()
    leaves = [t.clone().requires_grad_() for t in (x, scale, threshold)]
    with cpu_isa(isa):
        ops.activation_binarize(*leaves).backward(grad)
    expected = reference.activation_binarize_backward(grad, x, scale, threshold)
    assert_equal(leaves[0].grad, expected[0])
    for leaf, want in zip(leaves[1:], expected[1:]):
        torch.testing.assert_close(leaf.grad, want, rtol=1e-5, atol=1e-5 * float(grad.abs().sum()))


@requires_compiled
@on_each_cpu_isa
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 15, 17, 33, 1025])
def test_binarization_and_mask_vector_tails(isa, n, dtype):
    """The other kernels on runs whose length is not a multiple of the vector width: per channel along
    the first axis (runs of n) and with n channels of one element (the inner == 1 loops)."""
    g = torch.Generator().manual_seed(n)
    for shape in ((3, n), (4, n, 1)):
        w = torch.where(torch.rand(shape, generator=g) < 0.1, 0.0, torch.randn(shape, generator=g)).to(dtype)
        for name in ("xnor_binarize", "dorefa_binarize"):
            with cpu_isa(isa):
                out = getattr(F, name)(w)
            assert_equal(out, getattr(reference, name)(w))
        mask = torch.rand(shape, generator=g) > 0.5
        with cpu_isa(isa):
            out = F.apply_mask(w, mask)
        assert_equal(out, reference.apply_mask(w, mask))
        x = w.unsqueeze(0) if len(shape) == 2 else w.transpose(0, 1).contiguous()  # runs of n; inner == 1
        grad = torch.randn(x.shape, generator=g).to(dtype)
        scale, threshold = torch.tensor([0.8]), torch.rand((1, x.shape[1]) + (1,) * (x.dim() - 2), generator=g)
        with cpu_isa(isa):
            out = F.activation_binarize(x, scale, threshold)
            got = F.activation_binarize_backward(grad, x, scale, threshold)
        assert_equal(out, reference.activation_binarize(x, scale, threshold))
        want = reference.activation_binarize_backward(grad, x, scale, threshold)
        assert_equal(got[0], want[0])
        for a, b in zip(got[1:], want[1:]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * (float(grad.float().abs().sum()) + 1))


# ---------------------------------------------------------------------------
# Masks

@on_each_cpu_isa
@settings(deadline=None)
@given(w=weights(), mask_kind=st.sampled_from(["same", "channel", "bool", "half", "double"]))
def test_apply_mask(isa, w, mask_kind):
    g = torch.Generator().manual_seed(w.numel())
    shape = w.shape if mask_kind != "channel" else (w.shape[0],) + (1,) * (w.dim() - 1)
    mask = torch.rand(shape, generator=g)
    mask = {"bool": mask > 0.5, "half": mask.half(), "double": mask.double()}.get(mask_kind, mask)
    with cpu_isa(isa):
        out = F.apply_mask(w, mask)
    assert_equal(out, reference.apply_mask(w, mask))
    assert_equal(out, (w.float() * mask.float()).to(w.dtype))


def test_apply_mask_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, generator=g).requires_grad_()
    for mask in (torch.rand(3, 4, generator=g), torch.rand(3, 1, generator=g)):
        mask.requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # gradcheck warns about float32 inputs; the op is bilinear
            assert torch.autograd.gradcheck(ops.apply_mask, (w, mask), eps=1e-2, atol=1e-3, rtol=1e-3)
        out_grad = torch.randn(3, 4, generator=g)
        got = torch.autograd.grad(ops.apply_mask(w, mask), (w, mask), out_grad)
        want = reference.apply_mask_backward(out_grad, w.detach(), mask.detach())
        assert_equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])


# ---------------------------------------------------------------------------
# Errors: both implementations reject bad input with the same ValueError

def _bad_calls():
    x = torch.randn(2, 4)
    s4, z4 = torch.full((4,), 0.1), torch.zeros(4)
    s1, z1 = torch.full((1,), 0.1), torch.zeros(1)
    act_x, act_s, act_t = torch.randn(2, 3, 4), torch.ones(1), torch.full((1, 3, 1), 0.5)
    return [
        ("fake_quantize", (x, torch.zeros(1), z1, -8, 7, None), r"scale must be positive, got 0"),
        ("fake_quantize", (x, torch.tensor([0.1, -1.0, 0.1, 0.1]), z4, -8, 7, 1), r"scale must be positive.*index 1"),
        ("fake_quantize", (x, s1, z1, 5, 5, None), r"quant_min \(5\) must be less than quant_max \(5\)"),
        ("fake_quantize", (x, s4, z4, -8, 7, 2), r"axis 2 is out of range for x with 2 dimensions"),
        ("fake_quantize", (x, s4, z4, -8, 7, -3), r"axis -3 is out of range"),
        ("fake_quantize", (x, s4[:3], z4, -8, 7, 1), r"needs 4 scale values \(x.shape\[1\]\), got 3"),
        ("fake_quantize", (x, s4, z4[:2], -8, 7, -1), r"needs 4 zero_point values"),
        ("fake_quantize", (x, s4, z1, -8, 7, None), r"per-tensor quantization \(axis=None\) needs a scale with 1"),
        ("fake_quantize", (x.int(), s1, z1, -8, 7, None), r"x must be float32, float16 or bfloat16, got torch.int32"),
        ("fake_quantize", (x, s1, z1.int(), -8, 7, None), r"zero_point must be a floating-point tensor"),
        ("fake_quantize", (x, s1, torch.full((1,), float("nan")), -8, 7, None), r"zero_point must be finite"),
        ("fake_quantize_backward", (torch.ones(2, 3), x, s1, z1, -8, 7, None),
         r"grad must have the shape and dtype of x"),
        ("fake_quantize_learnable", (x, -s1, z1, -8, 7, None, 0.0), r"min_scale must be a positive finite number"),
        ("fake_quantize_learnable", (x, -s1, z1, -8, 7, None, float("inf")), r"min_scale must be a positive finite"),
        ("fake_quantize_learnable", (x, torch.full((1,), float("nan")), z1, -8, 7, None, 1e-8),
         r"scale must be positive, got nan"),
        ("fake_quantize_learnable", (x, -s4, z4[:2], -8, 7, -1, 1e-8), r"needs 4 zero_point values"),
        ("fake_quantize_learnable_backward", (torch.ones(2, 3), x, -s1, z1, -8, 7, None, 1e-8),
         r"grad must have the shape and dtype of x"),
        ("xnor_binarize", (torch.tensor(1.0),), r"w must have at least 1 dimension"),
        ("dorefa_binarize", (x.double(),), r"w must be float32, float16 or bfloat16, got torch.float64"),
        ("activation_binarize", (act_x, torch.ones(2), act_t), r"scale must have 1 element, got 2"),
        ("activation_binarize", (act_x, -act_s, act_t), r"scale must be positive"),
        ("activation_binarize", (act_x, act_s, torch.ones(2)), r"threshold must have 1 or x.shape\[1\] = 3"),
        ("activation_binarize", (torch.randn(5), act_s, torch.ones(1)), r"x must have at least 2 dimensions"),
        ("activation_binarize_backward", (torch.ones(2, 3, 5), act_x, act_s, act_t), r"grad must have the shape"),
        ("apply_mask", (x, torch.ones(3, 4)), r"mask of shape \[3, 4\] does not broadcast to w of shape \[2, 4\]"),
        ("apply_mask", (x, torch.ones(2, 4, dtype=torch.int64)), r"mask must be a floating-point or bool tensor"),
    ]


@pytest.mark.parametrize("impl", ["compiled", "reference", "wrapper"])
@pytest.mark.parametrize("name,args,message", _bad_calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_arguments_raise_clear_value_errors(impl, name, args, message):
    if impl == "compiled":
        fn = getattr(F, name)
        if ops.backend() == "reference":
            pytest.skip("the compiled op library is not built")
    elif impl == "reference":
        fn = getattr(reference, name)
    else:
        fn = getattr(ops, name, None)
        if fn is None:
            pytest.skip(f"{name} has no public wrapper")
    with pytest.raises(ValueError, match=message):
        fn(*args)


def test_wrappers_reject_non_tensors():
    with pytest.raises(TypeError, match="scale must be a torch.Tensor, got float"):
        ops.fake_quantize(torch.ones(2), 0.1, torch.zeros(1), 0, 255)


# ---------------------------------------------------------------------------
# Registration: opcheck, tracing, compile, export

def _opcheck_cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, generator=g)
    s3, z3 = torch.rand(3, generator=g) * 0.1 + 0.01, torch.randn(3, generator=g)
    s1, z1 = torch.full((1,), 0.05), torch.full((1,), 3.0)
    t3 = torch.rand(1, 3, 1, generator=g)
    grad = torch.randn(2, 3, 4, generator=g)

    def leaf(*ts):
        return tuple(t.clone().requires_grad_() for t in ts)

    return [
        (F.fake_quantize.default, (*leaf(x, s3, z3), -8, 7, 1)),
        (F.fake_quantize.default, (*leaf(x.half(), s1, z1), 0, 15, None)),
        (F.fake_quantize_backward.default, (grad, x, s3, z3, -8, 7, -2)),
        (F.fake_quantize_learnable.default, (*leaf(x, -s3, z3), -8, 7, 1, 1e-8)),
        (F.fake_quantize_learnable.default, (*leaf(x.bfloat16(), s1, z1), 0, 15, None, 0.1)),
        (F.fake_quantize_learnable_backward.default, (grad, x, -s3, z3, -8, 7, -2, 1e-8)),
        (F.xnor_binarize.default, leaf(x)),
        (F.dorefa_binarize.default, leaf(x.bfloat16())),
        (F.activation_binarize.default, leaf(x, torch.ones(1), t3)),
        (F.activation_binarize_backward.default, (grad, x, torch.ones(1), t3)),
        (F.apply_mask.default, leaf(x, torch.rand(2, 3, 4, generator=g))),
        (F.apply_mask.default, leaf(x, torch.rand(2, 1, 1, generator=g))),
    ]


@pytest.mark.parametrize("op,args", _opcheck_cases(), ids=lambda v: str(v) if not isinstance(v, tuple) else "")
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


class _AllOps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.full((6,), 0.05))
        self.zero_point = torch.nn.Parameter(torch.zeros(6))
        self.act_scale = torch.nn.Parameter(torch.ones(1))
        self.threshold = torch.nn.Parameter(torch.full((1, 6, 1), 0.5))
        self.mask = torch.nn.Parameter(torch.rand(6, 6))
        self.weight = torch.nn.Parameter(torch.randn(6, 6))

    def forward(self, x):
        w = ops.apply_mask(self.weight, self.mask)
        w = ops.xnor_binarize(w) + ops.dorefa_binarize(w)
        h = torch.einsum("oc,bcl->bol", w, x)
        h = ops.activation_binarize(h, self.act_scale, self.threshold)
        return ops.fake_quantize(h, self.scale, self.zero_point, 0, 255, 1)


def _op_targets(graph):
    return {str(n.target) for n in graph.nodes if n.op == "call_function" and "fxcompress" in str(n.target)}


ALL_OPS = {"fxcompress.apply_mask.default", "fxcompress.xnor_binarize.default",
           "fxcompress.dorefa_binarize.default", "fxcompress.activation_binarize.default",
           "fxcompress.fake_quantize.default"}


def test_ops_trace_with_fx_and_export():
    model, x = _AllOps(), torch.randn(2, 6, 5)
    gm = torch.fx.symbolic_trace(model)
    assert {t.removesuffix(".default") for t in _op_targets(gm.graph)} == {t.removesuffix(".default")
                                                                          for t in ALL_OPS}
    assert_equal(gm(x), model(x))
    ep = torch.export.export(model, (x,))
    assert _op_targets(ep.graph) == ALL_OPS
    assert_equal(ep.module()(x), model(x))


def test_ops_compile_forward_and_backward():
    torch.manual_seed(0)
    model, x = _AllOps(), torch.randn(2, 6, 5)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out, expected = compiled(x), model(x)
    assert_equal(out, expected)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, list(model.parameters()), grad)
    want = torch.autograd.grad(expected, list(model.parameters()), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_fake_quantize_exports_to_onnx_under_its_name():
    # torch.onnx.export(dynamo=True) sees the op by name: a translation for
    # fxcompress::fake_quantize (QuantizeLinear/DequantizeLinear) is picked up.
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from onnxscript import opset18 as op

    def fake_quantize_qdq(x, scale, zero_point, quant_min: int, quant_max: int, axis=None):
        zp = op.Cast(zero_point, to=onnx.TensorProto.INT8 if quant_min < 0 else onnx.TensorProto.UINT8)
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zp), scale, zp)

    class Quantized(torch.nn.Module):
        def forward(self, x):  # a power-of-two scale: x / s is exact in every implementation
            return ops.fake_quantize(x, torch.full((1,), 0.125), torch.full((1,), 3.0), 0, 255)

    model, x = Quantized().eval(), torch.linspace(-2, 30, 64).reshape(2, 32)
    onnx_program = torch.onnx.export(model, (x,), dynamo=True, verbose=False,
                                     custom_translation_table={F.fake_quantize.default: fake_quantize_qdq})
    node_types = {n.op_type for n in onnx_program.model.graph}
    assert {"QuantizeLinear", "DequantizeLinear"} <= node_types
    ort = pytest.importorskip("onnxruntime")
    import numpy as np

    session = ort.InferenceSession(onnx_program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (result,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_array_equal(result, model(x).numpy())


# ---------------------------------------------------------------------------
# CUDA (runs only where a GPU is present)

@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@settings(deadline=None)
@given(fq_cases())
def test_cuda_kernels_match_cpu(case):
    x, scale, zero_point, grad = tensors = case.tensors()
    cuda = [t.cuda() for t in tensors]
    assert_equal(F.fake_quantize(*cuda[:3], *case.args).cpu(), reference.fake_quantize(x, scale, zero_point,
                                                                                      *case.args))
    got = [g.cpu() for g in F.fake_quantize_backward(cuda[3], *cuda[:3], *case.args)]
    check_fake_quantize_backward(got, reference.fake_quantize_backward(grad, x, scale, zero_point, *case.args),
                                 tensors, case.args)
    if x.dim() >= 2:
        for name in ("xnor_binarize", "dorefa_binarize"):
            assert_equal(getattr(F, name)(cuda[0]).cpu(), getattr(reference, name)(x))
        mask = torch.rand(x.shape) > 0.5
        assert_equal(F.apply_mask(cuda[0], mask.cuda()).cpu(), reference.apply_mask(x, mask))
        act_scale, threshold = torch.ones(1), torch.rand(x.shape[1])
        assert_equal(F.activation_binarize(cuda[0], act_scale.cuda(), threshold.cuda()).cpu(),
                     reference.activation_binarize(x, act_scale, threshold))
