"""The door to PEFT's private internals: it works on the installed PEFT and fails loudly when a release changes."""

from __future__ import annotations

import re
from pathlib import Path

import peft
import pytest
from packaging.specifiers import SpecifierSet
from peft.tuners import tuners_utils
from peft.utils import PeftType

from peft_gnnmoe.utils import peft_internals
from peft_gnnmoe.utils.peft_internals import TESTED_PEFT_VERSIONS, PeftInternalsChanged, check_peft_internals

REPO = Path(__file__).resolve().parents[2]


def test_installed_peft_has_every_internal_we_use():
    check_peft_internals()


def test_installed_peft_is_a_tested_version():
    assert peft.__version__ in SpecifierSet(TESTED_PEFT_VERSIONS)


def test_setup_py_bounds_peft_to_the_tested_versions():
    setup = (REPO / "setup.py").read_text()
    match = re.search(r'"peft([<>=!~][^"]*)"', setup)
    assert match is not None, "setup.py has no peft requirement"
    assert SpecifierSet(match.group(1)) == SpecifierSet(TESTED_PEFT_VERSIONS)


@pytest.mark.parametrize("name", ["_get_tuner_state_dict_key_prefixes", "_filter_state_dict_by_key_prefixes"])
def test_a_missing_private_helper_is_reported_with_the_module_to_fix(monkeypatch, name):
    monkeypatch.delattr(tuners_utils, name)
    with pytest.raises(PeftInternalsChanged, match="peft_internals.py"):
        check_peft_internals()


def test_a_changed_signature_is_reported(monkeypatch):
    monkeypatch.setattr(tuners_utils, "_filter_state_dict_by_key_prefixes", lambda prefixes, state_dict: {})
    with pytest.raises(PeftInternalsChanged, match="signature"):
        check_peft_internals()


def test_changed_enum_internals_are_reported(monkeypatch):
    monkeypatch.delattr(PeftType, "_value2member_map_")
    with pytest.raises(PeftInternalsChanged, match="PeftType"):
        check_peft_internals()


def test_added_peft_type_is_a_genuine_enum_member():
    member = peft_internals.add_peft_type_member("PEFT_GNNMOE_TEST_MEMBER")
    assert PeftType("PEFT_GNNMOE_TEST_MEMBER") is member
    assert PeftType["PEFT_GNNMOE_TEST_MEMBER"] is member
    assert member in list(PeftType)
    assert isinstance(member, PeftType)
    assert member == "PEFT_GNNMOE_TEST_MEMBER"
    assert peft_internals.add_peft_type_member("PEFT_GNNMOE_TEST_MEMBER") is member


def test_our_tuner_types_are_registered_through_the_door():
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    import peft_gnnmoe  # noqa: F401

    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.GNNMOE] is peft_gnnmoe.GNNMoEModel
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.SINK_DECORRELATION] is peft_gnnmoe.SinkDecorrelationModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.GNNMOE] == "gnnmoe_"
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.SINK_DECORRELATION] == "sink_decorrelation_"


def test_inner_adapter_injection_leaves_the_outer_config_alone(make_lm):
    from peft import LoraConfig

    model = make_lm()
    outer = {"outer": object()}
    model.peft_config = outer
    names = peft_internals.inject_inner_adapter(LoraConfig(r=2, target_modules=["q_proj"]), model, "default")
    assert model.peft_config is outer
    assert names
    assert all(name.endswith("q_proj") for name in names)
