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
    import yaml
    from lightning.pytorch.callbacks import ThroughputMonitor

    from piggy_lightning.data.chat import batch_size, batch_tokens
    from piggy_lightning.optim import CosineWithWarmup

    cli = _instantiate(tmp_path, config)
    assert isinstance(cli.model, PiggyModule) and cli.model.policy is None  # no weights loaded
    assert cli.datamodule is not None
    scheduler = yaml.safe_load(config.read_text())["model"].get("scheduler")
    if scheduler is None:
        assert cli.model.scheduler_factory is None
    else:  # a library schedule over the trainer's step count, built in configure_optimizers
        assert isinstance(cli.model.scheduler_factory, CosineWithWarmup)
        assert cli.model.scheduler_factory.warmup_steps == scheduler["init_args"]["warmup_steps"]
    (throughput,) = [c for c in cli.trainer.callbacks if isinstance(c, ThroughputMonitor)]  # the CLI adds it
    args = throughput.lazy_get_init_args()  # a lazy instance: initialized at its first hook
    assert (args.batch_size_fn, args.length_fn) == (batch_size, batch_tokens)


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
    """A preset appends callbacks (``trainer.callbacks+:``) or interventions of the experiment's Evaluate
    (``interventions+:``), and nothing else."""
    import yaml

    from piggy_lightning.callbacks import Evaluate

    spec = yaml.safe_load(preset.read_text())
    assert set(spec) <= {"trainer", "interventions+"} and set(spec.get("trainer", {})) <= {"callbacks+"}
    base = _instantiate(tmp_path, MAIN)
    cli = _instantiate(tmp_path, MAIN, preset)
    added = [c["class_path"].rsplit(".", 1)[-1] for c in spec.get("trainer", {}).get("callbacks+", [])]
    before, after = _class_names(base.trainer.callbacks), _class_names(cli.trainer.callbacks)
    for name in added:
        assert after.count(name) == before.count(name) + 1, (name, after)
    assert len(after) == len(before) + len(added)
    (evaluate,) = [c for c in cli.trainer.callbacks if isinstance(c, Evaluate)]
    wanted = [c["class_path"].rsplit(".", 1)[-1] for c in spec.get("interventions+", [])]
    assert _class_names(evaluate.interventions) == wanted


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


def test_a_weight_schedule_is_chosen_by_class_path(tmp_path):
    """Hinge, window and warm-up are one ``schedule`` component of any regularizer, composed by class path."""
    from piggy_lightning.regularizers import Hinge, LinearWarmup, ScheduleChain

    overlay = tmp_path / "schedule.yaml"
    overlay.write_text(
        "model:\n"
        "  regularizers:\n"
        "    - class_path: piggy_lightning.regularizers.PrefixKVDrift\n"
        "      init_args:\n"
        "        weight: 30.0\n"
        "        schedule:\n"
        "          class_path: piggy_lightning.regularizers.ScheduleChain\n"
        "          init_args:\n"
        "            schedules:\n"
        "              - {class_path: piggy_lightning.regularizers.LinearWarmup, init_args: {end: 0.2}}\n"
        "              - {class_path: piggy_lightning.regularizers.Hinge, init_args: {threshold: 0.5}}\n"
    )
    cli = _instantiate(tmp_path, MAIN, overlay)
    (reg,) = cli.model.regularizers
    assert isinstance(reg.schedule, ScheduleChain)
    warmup, hinge = reg.schedule.schedules
    assert isinstance(warmup, LinearWarmup) and warmup.end == 0.2 and isinstance(hinge, Hinge)
    assert hinge.threshold == 0.5
