"""The training-method seam: the recipe's method names, the registry and the plan's costs agree, and every
registered method keeps the contract the shared run relies on."""

from __future__ import annotations

import inspect

import pytest

from qlora_cli.core.recipe import TRAINING_METHODS
from qlora_cli.train.methods import COSTS, METHOD_NAMES, load_method
from qlora_cli.train.methods.base import TrainingMethod


def test_recipe_registry_and_plan_name_the_same_methods():
    assert set(TRAINING_METHODS) == set(METHOD_NAMES) == set(COSTS)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_method_implements_the_contract(name):
    method = load_method(name)
    assert method.name == name
    assert isinstance(method.metric_names, tuple)
    for member, declared in inspect.getmembers(TrainingMethod, inspect.isfunction):
        if member.startswith("_"):
            continue
        implemented = getattr(method, member, None)
        assert callable(implemented), f"{name} lacks {member}"
        assert list(inspect.signature(implemented).parameters) == list(inspect.signature(declared).parameters)[1:], member


def test_each_run_gets_its_own_method_instance():
    assert load_method("sft") is not load_method("sft")
