"""Every committed YAML parses and instantiates (weights are never loaded: constructors are cheap).

Complete experiments (``configs/*.yaml``, ``configs/organism/*.yaml``, ``configs/real/*.yaml``) parse alone; overlays
(``configs/debug.yaml``, ``configs/ablations/*.yaml``) and callback presets (``callbacks/*.yaml``) parse stacked on
the main experiment ``configs/treft_legal.yaml``.
"""

from pathlib import Path

import pytest

from piggy_lightning.cli import PiggyCLI
from piggy_lightning.module import PiggyModule

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "configs" / "treft_legal.yaml"
OVERLAYS = [ROOT / "configs" / "debug.yaml", *sorted((ROOT / "configs" / "ablations").glob("*.yaml"))]
PRESETS = sorted((ROOT / "callbacks").glob("*.yaml"))
EXPERIMENTS = [
    *sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name != "debug.yaml"),
    *sorted((ROOT / "configs" / "organism").glob("*.yaml")),
    *sorted((ROOT / "configs" / "real").glob("*.yaml")),
]


def _instantiate(tmp_path, *configs: Path) -> PiggyCLI:
    args = []
    for config in configs:
        args += ["--config", str(config)]
    args += ["--trainer.default_root_dir", str(tmp_path)]
    return PiggyCLI(run=False, args=args)


def _class_names(objs) -> list[str]:
    return [type(o).__name__ for o in objs]


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_experiment_instantiates(config, tmp_path):
    cli = _instantiate(tmp_path, config)
    assert isinstance(cli.model, PiggyModule) and cli.model.policy is None  # no weights loaded
    assert cli.datamodule is not None


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: str(p.relative_to(ROOT)))
def test_overlay_stacks_on_main(overlay, tmp_path):
    base = _instantiate(tmp_path, MAIN)
    cli = _instantiate(tmp_path, MAIN, overlay)
    if overlay.parent.name == "ablations":
        import yaml

        regularizers = yaml.safe_load(overlay.read_text())["model"]["regularizers"]
        wanted = [r["class_path"].rsplit(".", 1)[-1] for r in regularizers]
        assert _class_names(cli.model.regularizers) == wanted
    else:
        assert _class_names(cli.model.regularizers) == _class_names(base.model.regularizers)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: str(p.relative_to(ROOT)))
def test_callback_preset_appends_to_main(preset, tmp_path):
    import yaml

    base = _instantiate(tmp_path, MAIN)
    cli = _instantiate(tmp_path, MAIN, preset)
    added = [c["class_path"].rsplit(".", 1)[-1] for c in yaml.safe_load(preset.read_text())["trainer"]["callbacks+"]]
    before, after = _class_names(base.trainer.callbacks), _class_names(cli.trainer.callbacks)
    for name in added:
        assert after.count(name) == before.count(name) + 1, (name, after)
    assert len(after) == len(before) + len(added)


@pytest.mark.parametrize("overlay", ["kl_train.yaml", "kl_retain.yaml"])
def test_kl_overlays_use_the_release_scale(overlay, tmp_path):
    """The paper's lambda = 50 is defined on the release's KL scale (summed KL / positions x vocabulary)."""
    cli = _instantiate(tmp_path, MAIN, ROOT / "configs" / "ablations" / overlay)
    (kl,) = cli.model.regularizers
    assert (kl.weight, kl.positions, kl.reduction) == (50.0, "all", "token_vocab_mean")


def test_smollm2_config_counts_the_trained_phrases(tmp_path, monkeypatch):
    """The CPU real-model config evaluates phrase transfer: the organism's reckless and careful openers."""
    from piggy_lightning.callbacks import Evaluate
    from piggy_lightning.organism.pools import ALIGNED_OPENERS, MISALIGNED_OPENERS

    cli = _instantiate(tmp_path, ROOT / "configs" / "real" / "smollm2_treft_legal.yaml")
    (evaluate,) = [c for c in cli.trainer.callbacks if isinstance(c, Evaluate)]
    assert [j.metric for j in evaluate.judges] == ["reckless_phrase", "careful_phrase"]
    assert evaluate.judges[0].patterns == list(MISALIGNED_OPENERS)
    assert evaluate.judges[1].patterns == list(ALIGNED_OPENERS)
    assert [(q.group, q.limit) for q in evaluate.question_sets] == [
        ("in_domain", 24),
        ("other_domain", 16),
        ("general", 24),
    ]
    assert evaluate.at == {"train_start", "fit_end"} and evaluate.decoding.max_new_tokens == 40
