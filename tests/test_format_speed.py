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
    """A fake clock, and ``use(latency)``: from then on every BERT forward takes ``latency(model, call)`` seconds
    on it (``model``: 0 for the first model timed, 1 for the next...; ``call``: all forwards so far). ``use``
    returns each model's (start, end) on the clock."""
    clock = FakeClock()
    spans: dict[int, list[float]] = {}
    original = BertModel.forward

    def use(latency) -> dict[int, list[float]]:
        calls = itertools.count()

        def forward(self, *args, **kwargs):
            model = self.__dict__.setdefault("_timed_as", len(spans))
            span = spans.setdefault(model, [clock.now, clock.now])
            clock.now += latency(model, next(calls))
            span[1] = clock.now
            return original(self, *args, **kwargs)

        monkeypatch.setattr(BertModel, "forward", forward)
        return spans

    return clock, use


def test_runs_that_agree_stop_after_the_repetitions(timed):
    clock, use = timed
    spans = use(lambda model, call: 0.1)
    records = list(format_speed.measure(bert(), SCHEMES, clock=clock))
    assert [r["backend"] for r in records] == ["fp32", "bf16", "torchao-int8wo"]
    runs = format_speed.QUICK_SPEC.warmup + format_speed.QUICK_SPEC.repetitions
    assert clock.now == pytest.approx(len(SCHEMES) * runs * 0.1)  # nothing repeated beyond three timed runs each
    assert len(spans) == len(SCHEMES)
    assert all(r["agreed"] and not r["noisy"] and r["repetitions"] == 3 for r in records)
    assert all(r["spread_pct"] == pytest.approx(0.0, abs=1e-6) for r in records)


def test_runs_that_never_agree_share_the_cap_and_are_marked_noisy(timed):
    clock, use = timed
    spans = use(lambda model, call: 0.05 * 1.08**call)  # ever slower: no three runs agree
    records = list(format_speed.measure(bert(), SCHEMES, cap_s=6.0, clock=clock))
    last = 0.05 * 1.08 ** (sum(r["repetitions"] + 1 for r in records) - 1)
    assert clock.now - last < 6.0 <= clock.now  # all three formats within the cap; no run started after it
    assert all(r["noisy"] and r["agreed"] is False and r["spread_pct"] > 10.0 for r in records)
    # Equal shares of what is left, in time: no format eats the cap of the ones after it.
    assert all(1.5 < end - start < 2.7 for start, end in spans.values()), spans


def test_one_noisy_format_leaves_the_cap_to_the_others_when_they_agree(timed):
    clock, use = timed
    spans = use(lambda model, call: 0.05 * 1.08**call if model == 0 else 0.1)
    records = list(format_speed.measure(bert(), SCHEMES, cap_s=12.0, clock=clock))
    assert [r["noisy"] for r in records] == [True, False, False]
    assert spans[0][1] >= 4.0  # the noisy one used its share, a third of the cap
    assert clock.now == pytest.approx(spans[0][1] + 2 * 4 * 0.1)  # the others stopped at their repetitions


def test_the_estimate_is_the_quiet_case_and_a_bad_cap_is_refused():
    from qlab.core.errors import QlabError

    loaded = bert()
    one = format_speed.estimate_seconds(loaded, SCHEMES[:1])
    assert format_speed.estimate_seconds(loaded, SCHEMES) == pytest.approx(3 * one)
    with pytest.raises(QlabError, match="time cap"):
        list(format_speed.measure(loaded, SCHEMES, cap_s=float("nan")))
