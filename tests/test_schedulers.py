"""Schedulers: every value at every step equals the closed form, and checkpoints resume the sequence.

The closed forms are written out here independently of fxcompress.schedulers.
"""
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxcompress.errors import ConfigError
from fxcompress.schedulers import (AdaptiveScheduler, ConstantScheduler, ExponentialScheduler,
                                   MultiStepScheduler, PolynomialScheduler, build_scheduler)

levels = st.floats(0.0, 0.95, allow_nan=False)


def ref_polynomial(t, i, T, E, p, concave):
    if E == 0:
        return T
    x = min(1.0, max(0.0, t / E))
    return T - (T - i) * (1 - x) ** p if concave else i + (T - i) * x ** p


def ref_exponential(t, i, T, E):
    if E == 0:
        return T
    density = (1 - i) * math.exp(math.log((1 - T) / (1 - i)) * t / E)
    return min(1 - max(density, 1 - T), T)


def ref_multistep(t, steps, values):
    return values[sum(1 for b in steps if b <= t)]


def walk(scheduler, epochs, steps_per_epoch):
    """The level seen before every optimizer step, as a training loop would."""
    seen = []
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            seen.append(scheduler.current_level)
            scheduler.step()
        scheduler.epoch_step()
    return seen


def expected(ref, epochs, steps_per_epoch, per_step, warmup=0, initial=0.0):
    out = []
    for e in range(epochs):
        for s in range(steps_per_epoch):
            t = e + (s / steps_per_epoch if per_step else 0.0)
            out.append(initial if e < warmup else ref(t - warmup))
    return out


@settings(deadline=None)
@given(i=levels, dT=st.floats(0.0, 0.5), E=st.integers(0, 6), p=st.floats(0.1, 4.0), concave=st.booleans(),
       per_step=st.booleans(), spe=st.integers(1, 5), warmup=st.integers(0, 2))
def test_polynomial_matches_closed_form(i, dT, E, p, concave, per_step, spe, warmup):
    T = min(i + dT, 0.99)
    s = PolynomialScheduler(initial_level=i, target_level=T, target_epoch=E, power=p, concave=concave,
                            update_per_optimizer_step=per_step, steps_per_epoch=spe, warmup_epochs=warmup)
    got = walk(s, E + warmup + 2, spe)
    want = expected(lambda t: ref_polynomial(t, i, T, E, p, concave), E + warmup + 2, spe, per_step, warmup, i)
    assert got == pytest.approx(want, abs=1e-12)
    assert got[-1] == pytest.approx(T)


@settings(deadline=None)
@given(i=levels, dT=st.floats(0.0, 0.5), E=st.integers(0, 6), per_step=st.booleans(), spe=st.integers(1, 5))
def test_exponential_matches_closed_form(i, dT, E, per_step, spe):
    T = min(i + dT, 0.99)
    s = ExponentialScheduler(initial_level=i, target_level=T, target_epoch=E,
                             update_per_optimizer_step=per_step, steps_per_epoch=spe)
    got = walk(s, E + 2, spe)
    want = expected(lambda t: ref_exponential(t, i, T, E), E + 2, spe, per_step)
    assert got == pytest.approx(want, abs=1e-12)
    assert got[-1] == pytest.approx(T)
    assert all(a <= b + 1e-12 for a, b in zip(got, got[1:])), "the level never decreases"


@settings(deadline=None)
@given(data=st.data(), n=st.integers(1, 4), spe=st.integers(1, 3), per_step=st.booleans())
def test_multistep_matches_closed_form(data, n, spe, per_step):
    steps = sorted(data.draw(st.sets(st.integers(0, 8), min_size=n, max_size=n)))
    values = data.draw(st.lists(levels, min_size=n + 1, max_size=n + 1))
    s = MultiStepScheduler(steps=steps, levels=values, update_per_optimizer_step=per_step, steps_per_epoch=spe)
    got = walk(s, steps[-1] + 2, spe)
    assert got == expected(lambda t: ref_multistep(t, steps, values), steps[-1] + 2, spe, per_step)
    assert s.target_level == values[-1]


def test_constant_schedule_after_warmup():
    s = ConstantScheduler(initial_level=0.0, target_level=0.4, warmup_epochs=2)
    assert walk(s, 4, 1) == [0.0, 0.0, 0.4, 0.4]


@settings(deadline=None)
@given(i=st.floats(0.0, 0.3), T=st.floats(0.4, 0.9), patience=st.integers(1, 3), step=st.floats(0.01, 0.2),
       eps=st.floats(0.0, 0.1), signal=st.lists(st.floats(0.0, 0.95), min_size=1, max_size=12))
def test_adaptive_follows_its_recurrence(i, T, patience, step, eps, signal):
    feed = iter(signal)
    s = AdaptiveScheduler(initial_level=i, target_level=T, patience=patience, step=step, eps=eps,
                          signal=lambda: next(feed))
    got = []
    for _ in signal:
        got.append(s.current_level)
        s.epoch_step()
    got.append(s.current_level)
    level, bad, want = i, 0, [i]
    for achieved in signal:  # the recurrence, written out
        if achieved >= level - eps:
            bad += 1
        if bad >= patience:
            bad, level = 0, min(level + step, T)
        want.append(level)
    assert got == pytest.approx(want, abs=1e-12)


def test_steps_per_epoch_is_measured_in_the_first_epoch():
    s = PolynomialScheduler(initial_level=0.0, target_level=0.5, target_epoch=2, power=1, concave=False,
                            update_per_optimizer_step=True)
    first = walk(s, 1, 4)
    assert first == [0.0] * 4, "epoch-wise until steps_per_epoch is known"
    assert s.steps_per_epoch == 4
    assert walk(s, 1, 4) == pytest.approx([0.25, 0.25 + 0.0625, 0.375, 0.4375])
    with pytest.warns(UserWarning, match="steps_per_epoch"):
        walk(s, 1, 3)


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("schedule,kwargs", [
    ("polynomial", dict(initial_level=0.1, target_level=0.7, target_epoch=4, power=2, concave=False,
                        update_per_optimizer_step=True)),
    ("exponential", dict(initial_level=0.0, target_level=0.6, target_epoch=3, update_per_optimizer_step=True,
                         steps_per_epoch=3)),
    ("multistep", dict(steps=[1, 3], levels=[0.1, 0.3, 0.6])),
    ("adaptive", dict(initial_level=0.1, target_level=0.5, patience=2)),
])
@pytest.mark.parametrize("cut", [2, 5, 7])
def test_resume_continues_the_same_sequence(schedule, kwargs, cut):
    signal_values = [0.05, 0.2, 0.3, 0.1, 0.4, 0.5, 0.5, 0.5, 0.5, 0.5]

    def make():
        s = build_scheduler(schedule, **kwargs)
        if schedule == "adaptive":
            s.set_signal(lambda: signal_values[s.current_epoch])
        return s

    def loop(s, start_epoch, epochs, record):
        for _ in range(start_epoch, epochs):
            for _ in range(3):
                record.append(s.current_level)
                s.step()
            s.epoch_step()

    straight = []
    loop(make(), 0, 6, straight)
    first, resumed = [], []
    a = make()
    loop(a, 0, cut // 3, first)
    for _ in range(cut % 3):  # stop in the middle of an epoch
        first.append(a.current_level)
        a.step()
    b = make()
    b.load_state_dict(roundtrip(a.state_dict()))
    assert b.current_level == a.current_level
    for _ in range(3 - cut % 3 if cut % 3 else 0):
        resumed.append(b.current_level)
        b.step()
    if cut % 3:
        b.epoch_step()
    loop(b, b.current_epoch, 6, resumed)
    assert first + resumed == straight


def test_listeners_run_after_every_counter_change():
    s = ExponentialScheduler(target_level=0.5, target_epoch=2)
    calls = []
    s.on_update(lambda sch: calls.append((sch.current_epoch, sch.current_level)))
    s.step()
    s.epoch_step()
    assert [c[0] for c in calls] == [0, 1]
    assert calls[-1][1] == pytest.approx(ref_exponential(1, 0.0, 0.5, 2))


@pytest.mark.parametrize("make,field", [
    (lambda: PolynomialScheduler(target_level=1.0), "target_level"),
    (lambda: PolynomialScheduler(initial_level=-0.1), "initial_level"),
    (lambda: PolynomialScheduler(power=0), "power"),
    (lambda: MultiStepScheduler(steps=[2, 1], levels=[0.1, 0.2, 0.3]), "multistep_steps"),
    (lambda: MultiStepScheduler(steps=[1], levels=[0.1]), "multistep_sparsity_levels"),
    (lambda: MultiStepScheduler(steps=[1], levels=[0.1, 1.2]), "multistep_sparsity_levels[1]"),
    (lambda: AdaptiveScheduler(patience=0), "patience"),
    (lambda: build_scheduler("cosine"), "schedule"),
])
def test_bad_scheduler_arguments_name_the_field(make, field):
    with pytest.raises(ConfigError) as info:
        make()
    assert info.value.path == field
    assert field in str(info.value)


# -- one factory, one multistep check, one staged rule (issue 13) ---------------------------------

def test_multistep_lists_are_checked_once_with_the_config_path():
    from fxcompress.passes import MagnitudeSparsity
    with pytest.raises(ConfigError) as info:
        MagnitudeSparsity(schedule="multistep", multistep_steps=[1, 2], multistep_sparsity_levels=[0.1, 0.2])
    assert info.value.path.endswith("multistep_sparsity_levels")
    assert "one more entry than multistep_steps (2 steps, 2 levels)" in str(info.value)
    with pytest.raises(ConfigError) as info:
        MagnitudeSparsity(schedule="multistep", multistep_steps=[2, 1], multistep_sparsity_levels=[0.1, 0.2, 0.3])
    assert info.value.path.endswith("multistep_steps") and "increasing" in str(info.value)


def test_an_algorithms_own_schedule_table_goes_through_the_one_factory():
    from fxcompress.passes.pruning.schedule import (PRUNING_SCHEDULES, ExponentialWithBiasScheduler,
                                                    build_pruning_scheduler)
    s = build_pruning_scheduler("exponential_with_bias", 0.0, 0.5, num_init_steps=1, pruning_steps=5)
    assert isinstance(s, ExponentialWithBiasScheduler)
    assert (s.warmup_epochs, s.target_epoch, s.freeze_epoch) == (1, 4, 6)
    baseline = build_pruning_scheduler("baseline", 0.0, 0.4, num_init_steps=2, pruning_steps=5)
    assert isinstance(baseline, ConstantScheduler) and (baseline.target_epoch, baseline.freeze_epoch) == (0, 2)
    with pytest.raises(ConfigError, match="unknown schedule 'polynomial'; known: exponential, "
                                          "exponential_with_bias, baseline"):
        build_scheduler("polynomial", PRUNING_SCHEDULES)


def test_staged_start_epochs_and_stage_names_are_one_rule():
    from fxcompress.passes.binarization.schedule import StagedBinarizationScheduler
    from fxcompress.passes.quantization.controller import QuantizationScheduler
    q = QuantizationScheduler([], {"activations_quant_start_epoch": 1, "weights_quant_start_epoch": 2})
    b = StagedBinarizationScheduler(1, 2)
    seen = []
    for _ in range(3):
        seen.append((q.stage, b.stage, q.enabled("activations"), q.enabled("weights")))
        q.epoch_step()
        b.epoch_step()
    assert seen == [("float", "float", False, False),
                    ("activations_quantized", "activations_binarized", True, False),
                    ("fully_quantized", "fully_binarized", True, True)]
    unstaged = QuantizationScheduler([], None)
    assert unstaged.start_epoch("weights") is None and unstaged.stage == "fully_quantized"
