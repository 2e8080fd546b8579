"""Algorithms defined outside pplrl: @register, --plugin files and modules, entry points, and
runs of them that eval, resume and diagnose without being told about the plugin."""

import json
import subprocess
import sys

import pytest

from pplrl import plugins
from pplrl.algorithms import ALGORITHMS, SAC, SACConfig, default_config, make_agent
from pplrl.cli import main as cli
from pplrl.plugins import PluginError, UnknownAlgorithmError, load_plugin, register, resolve
from pplrl.runner import agent_from_checkpoint, load_checkpoint, train, write_checkpoint

PLUGIN = '''
from dataclasses import dataclass

from pplrl.algorithms import SAC, SACConfig, register


@dataclass
class TinySACConfig(SACConfig):
    hidden: tuple[int, ...] = (32, 32)
    batch_size: int = 32
    learning_starts: int = 50


@register("tiny-sac")
class TinySAC(SAC):
    Config = TinySACConfig
'''
FAST = ["--quiet", "--eval-every", "200", "--eval-episodes", "1", "--checkpoint-every", "200"]


@pytest.fixture(autouse=True)
def _registry(clean_registry):
    """Every test here starts and ends with the shipped registry (conftest.clean_registry)."""


@pytest.fixture
def plugin_file(tmp_path):
    path = tmp_path / "my_algos.py"
    path.write_text(PLUGIN)
    return path


def forget(name="tiny-sac", module=False):
    """What a new process sees: the plugin's algorithm unregistered (and its module not imported)."""
    ALGORITHMS.pop(name, None)
    if module:
        for m in [m for m in sys.modules if m.startswith("pplrl_plugin_")]:
            del sys.modules[m]


def one_error_line(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_plugin_run_trains_evals_resumes_and_diagnoses_in_a_fresh_process(tmp_path, plugin_file, capsys):
    run = tmp_path / "runs" / "tiny"
    assert "tiny-sac" not in ALGORITHMS
    assert cli(["train", "tiny-sac", "--plugin", str(plugin_file), "--steps", "200", "--out", str(run), *FAST]) == 0
    assert "final evaluation return" in capsys.readouterr().out
    saved = json.loads((run / "config.json").read_text())
    assert saved["algo"] == "tiny-sac" and saved["plugin"] == str(plugin_file)
    assert saved["config"]["hidden"] == [32, 32] and saved["config"]["batch_size"] == 32
    assert load_checkpoint(run)["plugin"] == str(plugin_file)

    forget()  # registry only: the module is cached and registers again when loaded again
    assert cli(["eval", str(run), "--episodes", "1"]) == 0
    assert "tiny-sac at step 200" in capsys.readouterr().out
    forget(module=True)  # and a truly fresh process: the file is executed again
    assert cli(["train", "--resume", str(run), "--steps", "300", *FAST]) == 0
    assert load_checkpoint(run)["step"] == 300
    forget(module=True)
    assert cli(["diagnose", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "critic_loss" in out and "note:" not in out
    forget(module=True)
    agent, state = agent_from_checkpoint(run, "tiny-sac")
    assert type(agent).__name__ == "TinySAC" and agent.config.hidden == (32, 32) and state["step"] == 300

    # the plugin moved away: eval and resume say so in one line, diagnose still summarises the metrics
    plugin_file.rename(tmp_path / "elsewhere.py")
    forget(module=True)
    assert cli(["eval", str(run), "--episodes", "1"]) != 0
    one_error_line(capsys, "no such file", "recorded in", "--plugin")
    assert cli(["train", "--resume", str(run), "--steps", "400", *FAST]) != 0
    one_error_line(capsys, "no such file")
    assert cli(["diagnose", str(tmp_path / "runs")]) == 0
    assert "note:" in capsys.readouterr().out
    assert cli(["eval", str(run), "--episodes", "1", "--plugin", str(tmp_path / "elsewhere.py")]) == 0


def test_relative_plugin_path_is_recorded_absolute(tmp_path, plugin_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train("tiny-sac", default_config(resolve("tiny-sac", "my_algos.py")), tmp_path / "r", 60,
          eval_every=60, eval_episodes=1, checkpoint_every=60, progress=False, plugin="my_algos.py")
    assert json.loads((tmp_path / "r" / "config.json").read_text())["plugin"] == str(plugin_file.resolve())


def test_unknown_algorithms_are_one_error_line(tmp_path, plugin_file, capsys):
    assert cli(["train", "nope", "--steps", "10", "--out", str(tmp_path / "x"), "--quiet"]) != 0
    one_error_line(capsys, "unknown algorithm 'nope'; known: ", "sac, ", "vmbpo")
    assert not (tmp_path / "x").exists()
    # a plugin that loads but does not register the name
    assert cli(["train", "nope", "--plugin", str(plugin_file), "--steps", "10", "--quiet"]) != 0
    one_error_line(capsys, "unknown algorithm 'nope'", "tiny-sac", f"(plugin {plugin_file} was loaded and did not "
                                                                     "register it)")
    # a missing plugin file, and a module that is not there
    assert cli(["train", "tiny-sac", "--plugin", str(tmp_path / "missing.py"), "--steps", "10", "--quiet"]) != 0
    one_error_line(capsys, "missing.py", "no such file")
    assert cli(["train", "tiny-sac", "--plugin", "no_such_module_pplrl", "--steps", "10", "--quiet"]) != 0
    one_error_line(capsys, "no_such_module_pplrl", "ModuleNotFoundError")
    # a plugin that raises while loading: the exception and its line, no traceback
    broken = tmp_path / "broken.py"
    broken.write_text("import math\n\nraise RuntimeError('boom')\n")
    assert cli(["train", "tiny-sac", "--plugin", str(broken), "--steps", "10", "--quiet"]) != 0
    one_error_line(capsys, "broken.py", "RuntimeError: boom (line 3)")
    # eval and resume of runs whose algorithm is unknown
    run = tmp_path / "run"
    train("sac", default_config("sac", hidden=(16, 16), batch_size=16, learning_starts=50), run, 60, eval_every=60,
          eval_episodes=1, checkpoint_every=60, progress=False)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["plugin"] is None
    (run / "config.json").write_text(json.dumps({**cfg, "algo": "no-such-algorithm"}))
    assert cli(["train", "--resume", str(run), "--steps", "100", "--quiet"]) != 0
    one_error_line(capsys, "unknown algorithm 'no-such-algorithm'; known: ")
    state = load_checkpoint(run)
    state["algo"] = "no-such-algorithm"
    write_checkpoint(run, state)
    assert cli(["eval", str(run), "--episodes", "1"]) != 0
    one_error_line(capsys, "unknown algorithm 'no-such-algorithm'; known: ")
    assert cli(["diagnose", str(tmp_path)]) in (0, 2)  # no KeyError; too few records to summarise is fine
    assert "Traceback" not in capsys.readouterr().err


def test_train_with_a_class_and_the_api(tmp_path, plugin_file):
    module = load_plugin(str(plugin_file))
    assert load_plugin(str(plugin_file)) is module  # loaded twice: the same module, no clash
    TinySAC = module.TinySAC
    forget()

    agent = train(TinySAC, TinySAC.Config(), tmp_path / "c", 60, eval_every=60, eval_episodes=1, checkpoint_every=60,
                  progress=False)
    assert isinstance(agent, TinySAC) and ALGORITHMS["tiny-sac"] is TinySAC
    saved = json.loads((tmp_path / "c" / "config.json").read_text())
    assert saved["algo"] == "tiny-sac" and saved["plugin"] == str(plugin_file)  # inferred from the class

    class Unregistered(SAC):
        algo = "unregistered-sac"
        Config = SACConfig

    train(Unregistered, default_config(Unregistered, hidden=(16, 16), batch_size=16, learning_starts=50),
          tmp_path / "u", 60, eval_every=60, eval_episodes=1, checkpoint_every=60, progress=False)
    assert ALGORITHMS["unregistered-sac"] is Unregistered
    assert json.loads((tmp_path / "u" / "config.json").read_text())["plugin"] == __name__
    assert isinstance(make_agent(Unregistered, SACConfig(hidden=(8, 8)), 3, 1), Unregistered)
    assert resolve("tiny-sac") is TinySAC and resolve(TinySAC) is TinySAC


def test_register_checks(plugin_file):
    TinySAC = load_plugin(str(plugin_file)).TinySAC
    assert register("tiny-sac")(TinySAC) is TinySAC  # the same class again is fine

    class Other(SAC):
        Config = SACConfig

    with pytest.raises(ValueError, match=r"'tiny-sac' is already registered to .*TinySAC"):
        register("tiny-sac")(Other)
    with pytest.raises(ValueError, match="'sac' is already registered"):
        register("sac")(Other)
    with pytest.raises(ValueError, match="subclass of pplrl.algorithms.base.Agent"):
        register("not-an-agent")(dict)

    class NoConfig(SAC):
        Config = object

    with pytest.raises(ValueError, match="dataclass Config"):
        register("no-config")(NoConfig)
    with pytest.raises(ValueError, match="non-empty"):
        register("")
    from pplrl.algorithms import register as reexported

    assert reexported is register and plugins.ALGORITHMS is ALGORITHMS
    with pytest.raises(UnknownAlgorithmError, match=r"^unknown algorithm 'x'; known: [a-z-]+(, [a-z-]+)*$"):
        resolve("x")
    with pytest.raises(PluginError, match="neither a .py file nor a dotted module name"):
        load_plugin("not a module")


class FakeEntryPoint:
    def __init__(self, name, obj, value="fake_pkg.algos:Thing"):
        self.name, self.value, self._obj = name, value, obj

    def load(self):
        if isinstance(self._obj, Exception):
            raise self._obj
        return self._obj


def test_entry_points(monkeypatch, tmp_path, capsys):
    class EntrySAC(SAC):
        Config = SACConfig

    calls = []

    def fake(group):
        calls.append(group)
        return [FakeEntryPoint("entry-sac", EntrySAC)]

    # importing pplrl (and its algorithms, the CLI) loads no entry points
    probe = ("import importlib.metadata as m\n"
             "real = m.entry_points\n"
             "def checked(*a, group=None, **k):\n"
             "    assert group != 'pplrl.algorithms', 'entry points loaded at import'\n"
             "    return real(*a, group=group, **k) if group is not None else real(*a, **k)\n"
             "m.entry_points = checked\n"
             "import pplrl, pplrl.algorithms, pplrl.plugins, pplrl.runner, pplrl.cli\n")
    subprocess.run([sys.executable, "-c", probe], check=True)
    monkeypatch.setattr(plugins.importlib.metadata, "entry_points", lambda group: fake(group))
    assert resolve("sac") is SAC and calls == []  # known names need no entry points
    assert resolve("entry-sac") is EntrySAC and calls == ["pplrl.algorithms"] and EntrySAC.algo == "entry-sac"
    assert resolve("entry-sac") is EntrySAC and len(calls) == 1
    # a run of it records no plugin and is found through the entry point in a fresh process
    train("entry-sac", default_config("entry-sac", hidden=(16, 16), batch_size=16, learning_starts=50), tmp_path / "e",
          60, eval_every=60, eval_episodes=1, checkpoint_every=60, progress=False)
    assert json.loads((tmp_path / "e" / "config.json").read_text())["plugin"] is None
    forget("entry-sac")
    assert cli(["eval", str(tmp_path / "e"), "--episodes", "1"]) == 0

    # a broken entry point is a clear error naming it
    monkeypatch.setattr(plugins.importlib.metadata, "entry_points",
                        lambda group: [FakeEntryPoint("bad-one", ImportError("no module named fake_pkg"))])
    with pytest.raises(PluginError, match=r"entry point 'bad-one' \(fake_pkg.algos:Thing\).*ImportError"):
        resolve("not-there")
    assert cli(["train", "sac", "--steps", "10", "--quiet", "--out", str(tmp_path / "b")]) != 0
    one_error_line(capsys, "bad-one")
