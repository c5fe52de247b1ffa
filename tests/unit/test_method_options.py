"""A registered method's own config section: written at the top level under the method's name, typed and checked
like the shared sections, kept in config.yaml's round trip and seen by the rerun check."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import yaml

from uft_ray import methods
from uft_ray.config import ConfigError, load_config
from uft_ray.rerun import changes

NAME = "options_probe"
BASE = {"method": NAME, "model": {"path": "some/model"}}


@dataclass
class ProbeOptions:
    alpha: float = 0.5
    mode: str = "plain"


class ProbeMethod(methods.Method):
    name = NAME
    options = ProbeOptions

    def check(self, cfg, check_paths):  # noqa: ANN001, ANN201 (the base class has the types)
        o = self.options_of(cfg)
        return [] if o.mode in ("plain", "fancy") else [f"{NAME}.mode: plain or fancy, got {o.mode!r}"]


@pytest.fixture(autouse=True)
def registered():
    """The probe method only while each test runs: other tests see the registry as it was."""
    methods.register(ProbeMethod(), replace=True)
    yield
    methods.unregister(NAME)


def test_the_section_is_built_typed_and_overridable():
    cfg = load_config({**BASE, NAME: {"alpha": 2}}, [f"{NAME}.mode=fancy"], check_paths=False)
    assert cfg.options[NAME] == ProbeOptions(alpha=2.0, mode="fancy")
    assert methods.of(cfg).options_of(cfg).alpha == 2.0


def test_a_method_without_its_section_gets_its_defaults():
    cfg = load_config(BASE, check_paths=False)
    assert cfg.options == {NAME: ProbeOptions()}


def test_bad_values_and_keys_fail_naming_the_field():
    with pytest.raises(ConfigError) as e:
        load_config({**BASE, NAME: {"alpha": "lots", "beta": 1}}, check_paths=False)
    assert f"{NAME}.alpha: expected float, got 'lots'" in str(e.value)
    assert f"{NAME}.beta: unknown key; allowed: alpha, mode" in str(e.value)
    with pytest.raises(ConfigError, match=rf"{NAME}\.mode: plain or fancy, got 'odd'"):
        load_config({**BASE, NAME: {"mode": "odd"}}, check_paths=False)
    with pytest.raises(ConfigError, match=rf"no_such_section: unknown key; allowed: .*{NAME}"):
        load_config({**BASE, "no_such_section": {}}, check_paths=False)
    with pytest.raises(ConfigError, match="uft: unknown key"):  # a method with no section of its own
        load_config({"uft": {"alpha": 1}}, check_paths=False)


def test_config_yaml_round_trips_and_the_rerun_check_sees_a_changed_value():
    cfg = load_config({**BASE, NAME: {"alpha": 2}}, check_paths=False)
    written = yaml.safe_load(cfg.to_yaml())
    assert written[NAME] == {"alpha": 2.0, "mode": "plain"} and "options" not in written
    again = load_config(written, check_paths=False, resolve_paths=False)
    assert again.options == cfg.options
    other = load_config({**BASE, NAME: {"alpha": 3}}, check_paths=False)
    assert (f"{NAME}.alpha", 2.0, 3.0) in changes(written, other.to_dict())
    assert not [c for c in changes(written, again.to_dict()) if c[0].startswith(NAME)]
