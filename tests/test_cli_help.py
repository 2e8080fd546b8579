"""`pplrl train ALGO --help` lists ALGO's config fields with defaults and docstrings."""

import dataclasses

import pytest

from pplrl.algorithms import default_config
from pplrl.algorithms.base import field_docs
from pplrl.cli import main as cli


@pytest.fixture(autouse=True)
def _registry(clean_registry):
    """Every test here starts and ends with the shipped registry (conftest.clean_registry)."""


def help_text(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as stop:
        cli(["train", *argv, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("algo", ["sac", "mbpo", "beta-vmbpo"])
def test_help_lists_every_config_field_with_its_default(capsys, algo):
    text = help_text(capsys, algo)
    config = default_config(algo)
    listed = text.split(f"config of {algo}")[1]
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        assert f"  {f.name}={shown}  (" in listed, f.name
    for name, doc in field_docs(type(config)).items():
        assert doc[:40] in " ".join(listed.split()), name


def test_field_docs_read_the_attribute_docstrings():
    docs = field_docs(type(default_config("mbpo")))
    assert docs["tau"] == "Polyak factor of the target networks"
    assert docs["gradient_steps"] == "SAC updates per environment step (paper: 20)"  # MBPO's own, not SAC's


def test_help_for_a_plugin_and_for_an_unknown_name(capsys):
    text = help_text(capsys, "behaviour-prior", "--plugin", "examples/behaviour_prior.py")
    assert "config of behaviour-prior" in text and "kl_target=" in text
    assert "no config listing: unknown algorithm 'nope'" in help_text(capsys, "nope")
    assert "config of mbpo" in help_text(capsys, "--quiet", "mbpo")  # after a flag that takes no value
    assert "config of" not in help_text(capsys, "--env", "mbpo")  # 'mbpo' is --env's value here
