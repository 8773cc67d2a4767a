"""The method registry: names agree with spec's --help choices, unknown names and unread options are refused."""

from __future__ import annotations

import pytest

from loratools import ArgumentError
from loratools.methods import METHOD_NAMES, MethodOptions, get_method
from loratools.methods.base import MAJORITY_SIGNS
from loratools.spec import MAJORITY_SIGN_CHOICES, METHOD_CHOICES


def test_registry_names_are_specs_choices():
    assert METHOD_NAMES == METHOD_CHOICES
    assert MAJORITY_SIGNS == MAJORITY_SIGN_CHOICES
    assert all(get_method(n).paper.startswith("arXiv:") for n in METHOD_NAMES)


def test_unknown_method_is_refused_naming_the_known_ones():
    with pytest.raises(ArgumentError, match="unknown merge method 'tie'.*ties"):
        get_method("tie")


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan"), True])
def test_density_out_of_range_is_refused(density):
    with pytest.raises(ArgumentError, match="density must be in"):
        get_method("ties").check(MethodOptions(density), density_given=True, sign_given=False)


def test_options_a_method_does_not_read_are_refused():
    with pytest.raises(ArgumentError, match="task_arithmetic has no density"):
        get_method("task_arithmetic").check(MethodOptions(0.5), density_given=True, sign_given=False)
    with pytest.raises(ArgumentError, match="dare elects no sign"):
        get_method("dare").check(MethodOptions(0.5, "frequency"), density_given=True, sign_given=True)
    with pytest.raises(ArgumentError, match="majority sign must be one of"):
        get_method("ties").check(MethodOptions(0.5, "mean"), density_given=True, sign_given=True)
