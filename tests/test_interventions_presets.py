"""Every preset in ``callbacks/`` parses stacked on the main experiment, ``configs/treft_legal.yaml``: an intervention
preset adds exactly its interventions, with the preset's arguments, to the experiment's ``Evaluate`` (through the
top-level ``interventions+:``), a training preset appends exactly its callback; presets also stack on each other."""

from pathlib import Path

import pytest
import yaml

from piggy_lightning.callbacks import Evaluate
from piggy_lightning.cli import PiggyCLI
from piggy_lightning.interventions import Intervention
from piggy_lightning.module import PiggyModule

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "configs" / "treft_legal.yaml"
PRESETS = sorted((ROOT / "callbacks").glob("*.yaml"))
INTERVENTION_PRESETS = [p for p in PRESETS if "interventions+" in yaml.safe_load(p.read_text())]


def _cli(tmp_path, monkeypatch, *configs):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(PiggyModule, "configure_model", lambda self: None)
    args = [a for c in configs for a in ("--config", str(c))] + ["--trainer.default_root_dir", str(tmp_path)]
    return PiggyCLI(run=False, args=args)


def _evaluate(cli) -> Evaluate:
    (evaluate,) = [c for c in cli.trainer.callbacks if isinstance(c, Evaluate)]
    return evaluate


def _same(got, value) -> bool:
    """A constructed argument against its YAML value: a dataclass (a PatchSite) field by field, a set as a list,
    a component (``class_path`` + ``init_args``) by its class name and arguments, a list item by item."""
    if isinstance(value, dict) and "class_path" in value:
        return type(got).__name__ == value["class_path"].rsplit(".", 1)[-1] and _same(got, value.get("init_args", {}))
    if isinstance(value, dict):
        return all(_same(getattr(got, k), v) for k, v in value.items())
    if isinstance(value, list) and isinstance(got, (list, tuple)) and len(got) == len(value):
        return all(_same(g, v) for g, v in zip(got, value, strict=True))
    if isinstance(got, set):
        return got == set(value)
    return got == value


def test_presets_exist():
    assert {p.stem for p in PRESETS} >= {
        "prefix_patching",
        "postfix_patching",
        "residual_sweep",
        "prefix_perturbation",
        "perturbed_prefix_training",
        "data_interleaving",
    }
    assert {p.stem for p in INTERVENTION_PRESETS} >= {"prefix_patching", "residual_sweep", "prefix_perturbation"}


@pytest.mark.parametrize("preset", INTERVENTION_PRESETS, ids=lambda p: p.stem)
def test_intervention_preset_adds_its_interventions_to_evaluate(preset, tmp_path, monkeypatch):
    base = _cli(tmp_path, monkeypatch, BASE)
    stacked = _cli(tmp_path, monkeypatch, BASE, preset)
    assert [type(c).__name__ for c in stacked.trainer.callbacks] == [type(c).__name__ for c in base.trainer.callbacks]
    assert _evaluate(base).interventions == []
    entries = yaml.safe_load(preset.read_text())["interventions+"]
    added = _evaluate(stacked).interventions
    assert len(added) == len(entries) and all(isinstance(i, Intervention) for i in added)
    for got, entry in zip(added, entries, strict=True):
        assert f"{type(got).__module__.split('.')[0]}.interventions.{type(got).__name__}" == entry["class_path"]
        for key, value in entry.get("init_args", {}).items():
            if key == "replacer":
                assert type(got.replacer).__name__ == value["class_path"].rsplit(".", 1)[-1]
                for k, v in value.get("init_args", {}).items():
                    assert getattr(got.replacer, k) == v, (k, v)
            else:
                assert _same(getattr(got, key), value), (key, getattr(got, key), value)
    assert _evaluate(stacked).needs_reference == any(i.needs_reference for i in added)


CALLBACK_PRESETS = [p for p in PRESETS if "callbacks+" in yaml.safe_load(p.read_text()).get("trainer", {})]


@pytest.mark.parametrize("preset", CALLBACK_PRESETS, ids=lambda p: p.stem)
def test_callback_preset_appends_its_callback_with_its_arguments(preset, tmp_path, monkeypatch):
    base = _cli(tmp_path, monkeypatch, BASE).trainer.callbacks
    stacked = _cli(tmp_path, monkeypatch, BASE, preset).trainer.callbacks
    (entry,) = yaml.safe_load(preset.read_text())["trainer"]["callbacks+"]
    (added,) = [c for c in stacked if type(c).__name__ not in {type(b).__name__ for b in base}]
    assert [type(c).__name__ for c in stacked if c is not added] == [type(c).__name__ for c in base]
    cls = type(added)
    assert entry["class_path"] in (f"{cls.__module__}.{cls.__name__}", f"piggy_lightning.callbacks.{cls.__name__}")
    for key, value in entry.get("init_args", {}).items():
        if key == "replacer":
            assert type(added.replacer).__name__ == value["class_path"].rsplit(".", 1)[-1]
            assert all(getattr(added.replacer, k) == v for k, v in value.get("init_args", {}).items())
        else:  # UtilityEvaluate keeps its Evaluate's arguments (judges, decoding) on that Evaluate
            owner = added if hasattr(added, key) else added.evaluate
            assert _same(getattr(owner, key), value), (key, getattr(owner, key), value)
    assert _evaluate(_cli(tmp_path, monkeypatch, BASE, preset)).interventions == []


def test_perturbed_training_preset(tmp_path, monkeypatch):
    preset = ROOT / "callbacks" / "perturbed_prefix_training.yaml"
    (added,) = [
        c
        for c in _cli(tmp_path, monkeypatch, BASE, preset).trainer.callbacks
        if type(c).__name__ == "PerturbedTraining"
    ]
    assert (added.segment, added.rate, added.n_tokens, added.replacer.k) == ("prefix", 1.0, 10, 5)
    assert not added.needs_reference


def test_presets_stack_on_each_other(tmp_path, monkeypatch):
    presets = [
        ROOT / "callbacks" / f"{s}.yaml" for s in ("prefix_perturbation", "query_perturbation", "prefix_patching")
    ]
    evaluate = _evaluate(_cli(tmp_path, monkeypatch, BASE, *presets))
    names = [i.name for i in evaluate.interventions]
    assert names == [
        "perturb_prefix_neighbours",
        "perturb_query_neighbours",
        "splice_kv_prefix",
        "patch_kv_query_matched",
    ]
    assert evaluate.needs_reference


def test_interventions_append_from_the_command_line(tmp_path, monkeypatch):
    cli = _cli(tmp_path, monkeypatch, BASE, ROOT / "callbacks" / "prefix_patching.yaml")
    assert [i.name for i in _evaluate(cli).interventions] == ["splice_kv_prefix", "patch_kv_query_matched"]
    monkeypatch.setattr(PiggyModule, "configure_model", lambda self: None)
    args = ["--config", str(BASE), "--interventions+=piggy_lightning.interventions.ResidualSweep",
            "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    (sweep,) = _evaluate(PiggyCLI(run=False, args=args)).interventions
    assert type(sweep).__name__ == "ResidualSweep" and sweep.at == {"test"}
