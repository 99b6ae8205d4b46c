"""qlab.backends.format_speed: the Overview's short speed measurement repeats each format's runs until they
agree or one time cap for all formats is spent. Real backends on a tiny BERT, timed on a fake clock that only
the model's forward passes move, so the counts below do not depend on this machine's load."""

import itertools

import pytest
from transformers import BertModel

from qlab.backends import format_speed
from qlab.core.quant import QuantScheme
from tests.tiny_models import tiny_bert

SCHEMES = [QuantScheme("fp32"), QuantScheme("bf16"), QuantScheme("int8", "group", 32)]


def bert():
    loaded = tiny_bert(layers=1)
    loaded.model.config.architectures = ["BertModel"]  # as a saved BERT's config.json names it
    return loaded


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def timed(monkeypatch):
    """A fake clock and a function that makes every BERT forward take the next of the latencies given."""
    clock = FakeClock()
    calls = []
    original = BertModel.forward

    def use(latencies) -> list:
        latencies = iter(latencies)

        def forward(self, *args, **kwargs):
            clock.now += next(latencies)
            calls.append(clock.now)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(BertModel, "forward", forward)
        return calls

    return clock, use


def test_runs_that_agree_stop_after_the_repetitions(timed):
    clock, use = timed
    calls = use(itertools.repeat(0.1))
    records = list(format_speed.measure(bert(), SCHEMES, clock=clock))
    assert [r["backend"] for r in records] == ["fp32", "bf16", "torchao-int8wo"]
    runs = format_speed.QUICK_SPEC.warmup + format_speed.QUICK_SPEC.repetitions
    assert len(calls) == len(SCHEMES) * runs  # nothing repeated beyond the three timed runs each
    assert all(r["agreed"] and not r["noisy"] and r["repetitions"] == 3 for r in records)
    assert all(r["spread_pct"] == pytest.approx(0.0, abs=1e-6) for r in records)


def test_runs_that_never_agree_share_the_cap_and_are_marked_noisy(timed):
    clock, use = timed
    use(itertools.cycle([0.1, 0.3]))
    records = list(format_speed.measure(bert(), SCHEMES, cap_s=6.0, clock=clock))
    assert 6.0 <= clock.now <= 6.0 + 0.3  # the whole measurement, all three formats, within the cap
    assert all(r["noisy"] and r["agreed"] is False and r["spread_pct"] > 10.0 for r in records)
    # Equal shares of what is left: no format eats the cap of the ones after it.
    counts = [r["repetitions"] for r in records]
    assert min(counts) >= 5 and max(counts) - min(counts) <= 3, counts


def test_one_noisy_format_leaves_the_cap_to_the_others_when_they_agree(timed):
    clock, use = timed
    # fp32 never agrees during its share (4 s of 12), then every run takes 0.1 s.
    calls = use(itertools.chain(itertools.islice(itertools.cycle([0.1, 0.3]), 20), itertools.repeat(0.1)))
    records = list(format_speed.measure(bert(), SCHEMES, cap_s=12.0, clock=clock))
    assert [r["noisy"] for r in records] == [True, False, False]
    assert clock.now < 12.0 and len(calls) <= 20 + 2 * 4 + 3


def test_the_estimate_is_the_quiet_case_and_a_bad_cap_is_refused():
    from qlab.core.errors import QlabError

    loaded = bert()
    one = format_speed.estimate_seconds(loaded, SCHEMES[:1])
    assert format_speed.estimate_seconds(loaded, SCHEMES) == pytest.approx(3 * one)
    with pytest.raises(QlabError, match="time cap"):
        list(format_speed.measure(loaded, SCHEMES, cap_s=float("nan")))
