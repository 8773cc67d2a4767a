"""Config regexes: PEFT's answers exactly (checked against PEFT itself), and runaway patterns refused."""

from __future__ import annotations

import re
import signal
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils.other import get_pattern_key, match_target_against_key

from loratools import patterns, spec
from loratools.errors import SpecError
from loratools.patterns import BUDGET_S, CODE, Job, first_matches, matches

from .factories import GiB, in_subprocess

NAMES = st.text(alphabet="ab._\n", max_size=10)
TOKENS = st.lists(st.sampled_from(["a", "b", "_", ".", r"\."]), min_size=1, max_size=5)
PLAIN_KEYS = st.builds(lambda caret, toks: caret + "".join(toks), st.sampled_from(["", "^"]), TOKENS)
GENERAL_KEYS = st.sampled_from(["a+", "(a|b)", r"b\.a*", ".*", "a?b", "[ab]{2}", "(?i:A)", "a$", "^b", r"(?!a)\w", "a|b.", r"\.", "a\n?"])


def _matches(key: str, name: str) -> bool:
    """PEFT's test for one key (peft 0.21.2 get_pattern_key)."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(PLAIN_KEYS, GENERAL_KEYS), min_size=1, max_size=6), st.lists(NAMES, min_size=1, max_size=8))
def test_pattern_keys_agree_with_peft(keys, names):
    keys = list(dict.fromkeys(keys))
    want = [next((k for k in keys if _matches(k, n)), None) for n in names]
    assert spec.pattern_keys(keys, names) == want
    for n, w in zip(names, want, strict=True):
        got = get_pattern_key(keys, n)  # peft 0.21.2: the key, or the name itself for no match
        assert got == (w if w is not None else n)


@settings(max_examples=200, deadline=None)
@given(st.one_of(PLAIN_KEYS, GENERAL_KEYS), st.lists(NAMES, min_size=1, max_size=8))
def test_fullmatch_agrees_with_peft_target_matching(pattern, names):
    assert matches("target_modules", pattern, names) == [match_target_against_key(pattern, n) is not None for n in names]


def test_plain_keys_by_hand():
    names = ["model.layers.0.q_proj", "modelXlayers.0.q_proj", "x.model.layers.0.q_proj", "xmodel.layers.0.q_proj"]
    names += ["q_proj\n", "a\n.q_proj"]
    assert spec.pattern_keys(["model.layers.0.q_proj"], names) == ["model.layers.0.q_proj"] * 3 + [None, None, None]
    assert spec.pattern_keys([r"^model\.layers\.0\.q_proj"], names) == [r"^model\.layers\.0\.q_proj", None, None, None, None, None]
    assert spec.pattern_keys(["q_proj"], names) == ["q_proj"] * 5 + [None]  # "$" before a final newline; ".*" stops at one
    assert spec.pattern_keys(["q_proj", "0.q_proj"], names[:1]) == ["q_proj"]  # first key in order, not the longest


def test_invalid_regex_is_a_spec_error_naming_the_field():
    with pytest.raises(SpecError, match=r"^rank_pattern: pattern '\(' is not a valid regular expression"):
        spec.pattern_keys(["("], ["a"])


BOMBS = [
    ("target_modules", "(.*a){25}", "targeted({'target_modules': '(.*a){25}'}, [name])", "a" * 60 + "b"),
    ("rank_pattern", "(a+)+$", "module_ranks({'r': 8, 'rank_pattern': {'(a+)+$': 4}}, [name])", "model.layers." + "a" * 40 + "b"),
    ("alpha_pattern", "(a|aa)+c", "module_alphas({'lora_alpha': 8, 'alpha_pattern': {'(a|aa)+c': 4}}, [name])", "x." + "a" * 60),
]


@pytest.mark.parametrize(("field", "pattern", "call", "name"), BOMBS)
def test_catastrophic_backtracking_is_refused_in_one_line_under_1_gib(field, pattern, call, name):
    code = f"""
    import time
    from loratools.spec import module_alphas, module_ranks, targeted
    from loratools.errors import SpecError
    name = {name!r}
    start = time.process_time()
    try:
        {call}
        result = None
    except SpecError as err:
        result = {{"message": str(err), "code": err.code, "key": err.key, "cpu": time.process_time() - start}}
    """
    result, rss = in_subprocess(code)
    assert result is not None, "the bomb was not refused"
    assert result["code"] == CODE and result["key"] == field
    assert result["message"].startswith(f"{field}: pattern {pattern!r} takes over 1 s") and "\n" not in result["message"]
    assert rss < GiB
    print(f"{field} {pattern!r}: refused after {result['cpu']:.2f} s CPU, peak RSS {rss / 2**20:.0f} MiB")


def test_off_the_main_thread_the_budget_still_holds():
    outcome: list[object] = []

    def work():
        try:
            outcome.append(spec.targets({"target_modules": "(.*a){25}"}, "a" * 60 + "b"))
        except SpecError as err:
            outcome.append(err)
        outcome.append(spec.targeted({"target_modules": r".*\.q_proj"}, ["m.q_proj", "m.k_proj"]))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert isinstance(outcome[0], SpecError) and outcome[0].code == CODE and outcome[0].key == "target_modules"
    assert outcome[1] == [True, False]


def test_someone_elses_timer_and_handler_survive():
    fired = []

    def handler(*_):
        fired.append(1)

    previous = signal.signal(signal.SIGVTALRM, handler)
    signal.setitimer(signal.ITIMER_VIRTUAL, 100.0)
    try:
        assert first_matches(Job("rank_pattern", ("a+",), ("a", "b"))) == [0, -1]
        assert signal.getsignal(signal.SIGVTALRM) is handler  # theirs is back in place
        remaining, _ = signal.getitimer(signal.ITIMER_VIRTUAL)
        assert 0 < remaining <= 100.1  # timer granularity
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, previous)
    assert not fired


def test_budget_is_one_second():
    assert BUDGET_S == 1.0  # the spec text and the refusal message say 1 s


def test_a_field_of_many_regexes_is_bounded_in_total(monkeypatch):
    monkeypatch.setattr(patterns, "FIELD_BUDGET_S", 0.02)
    names = tuple(f"model.layers.{i}.self_attn.q_proj" for i in range(20_000))
    keys = tuple(rf"layers\.{i}\.(self|cross)_attn\.q_proj" for i in range(400))  # regexes: no hash lookup
    with pytest.raises(SpecError, match=r"its 400 regex patterns take over 0.02 s together") as info:
        patterns.first_matches(patterns.Job("rank_pattern", keys, names, template=patterns.SUFFIX_TEMPLATE))
    assert info.value.code == "pattern-too-slow" and info.value.key == "rank_pattern"
