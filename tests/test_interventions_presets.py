"""Every preset in ``callbacks/`` parses stacked on the main experiment, ``configs/treft_legal.yaml``, and appends
exactly its callback with the preset's arguments; presets also stack on each other."""

from pathlib import Path

import pytest
import yaml

from piggy_lightning.cli import PiggyCLI
from piggy_lightning.module import PiggyModule

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "configs" / "treft_legal.yaml"
_OURS = ("patching", "residual_sweep", "perturbation", "interleaving")
PRESETS = [  # the intervention presets (tests/test_configs.py stacks every preset generically)
    p for p in sorted((ROOT / "callbacks").glob("*.yaml")) if any(f".{m}." in p.read_text() for m in _OURS)
]


def _cli(tmp_path, monkeypatch, *configs):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(PiggyModule, "configure_model", lambda self: None)
    args = [a for c in configs for a in ("--config", str(c))] + ["--trainer.default_root_dir", str(tmp_path)]
    return PiggyCLI(run=False, args=args)


def _ours(callbacks):
    return [
        c
        for c in callbacks
        if type(c).__module__.split(".")[-1] in ("patching", "residual_sweep", "perturbation", "interleaving")
    ]


def test_presets_exist():
    assert {p.stem for p in PRESETS} >= {
        "prefix_patching",
        "residual_sweep",
        "prefix_perturbation",
        "data_interleaving",
    }


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_stacks_on_the_main_config(preset, tmp_path, monkeypatch):
    base = _cli(tmp_path, monkeypatch, BASE).trainer.callbacks
    stacked = _cli(tmp_path, monkeypatch, BASE, preset).trainer.callbacks
    (entry,) = yaml.safe_load(preset.read_text())["trainer"]["callbacks+"]
    (added,) = _ours(stacked)
    assert f"{type(added).__module__}.{type(added).__name__}" == entry["class_path"]
    assert [type(c).__name__ for c in stacked if c is not added] == [type(c).__name__ for c in base]
    for key, value in entry.get("init_args", {}).items():
        got = getattr(added, {"evaluate": "evaluate_name"}.get(key, key))
        if key == "sites":
            got = [{k: getattr(s, k) for k in site} for s, site in zip(got, value, strict=True)]
        elif key == "at":
            value = set(value)
        assert got == value, (key, got, value)


def test_presets_stack_on_each_other(tmp_path, monkeypatch):
    callbacks = _cli(
        tmp_path, monkeypatch, BASE, *(ROOT / "callbacks" / f"{s}_perturbation.yaml" for s in ("prefix", "query"))
    )
    names = [c.name for c in _ours(callbacks.trainer.callbacks)]
    assert names == ["perturb_prefix_neighbours", "perturb_query_neighbours"]
