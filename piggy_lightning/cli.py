"""``PiggyCLI``: LightningCLI with the project's parsing settings, argument links and defaults.

Run ``python main.py --help`` for the subcommands (fit, validate, test, predict),
``python main.py fit --config configs/treft_legal.yaml --print_config`` for every option's value, and
``python main.py fit --help`` for each option's documentation. Class-typed options take a ``class_path`` (the class
path is the registry; nothing else is).

Rerunning a fit continues it. A run lives in its logger's directory ``<save_dir>/<name>/version_N``, whose
``config.yaml`` records what it computes. When ``trainer.logger.init_args.version`` is unset, ``fit`` looks for the
newest ``version_N`` whose ``config.yaml`` equals the current config (ignoring ``ckpt_path``, the config file
names and the logger's ``save_dir``/``version``) and continues there: from its ``checkpoints/last.ckpt`` (a plain
rerun means ``--ckpt_path last``; every ``ModelCheckpoint`` keeps ``last.ckpt`` unless ``save_last`` is set), with
its evaluation files and judge cache, so finished evaluation work is neither generated nor judged again. Any other
config gets a new ``version_N``. A fixed ``version`` whose directory holds another config is refused
(:class:`RunConfig`) instead of being overwritten.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml
from docstring_parser import DocstringStyle
from jsonargparse import Namespace, lazy_instance, set_parsing_settings
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from piggy_lightning.data.chat import batch_size, batch_tokens
from piggy_lightning.evaluation.questions import QuestionSet
from piggy_lightning.interventions.base import Intervention
from piggy_lightning.module import PiggyModule

set_parsing_settings(docstring_parse_style=DocstringStyle.GOOGLE)
_DOC_FLAGS = ("-h", "--help", "--print_config")  # the only commands that show parsed documentation


def _wants_docs(args: Any) -> bool:
    """Whether the command line asks for ``--help`` or ``--print_config`` (a dict or Namespace of args: assume yes)."""
    args = sys.argv[1:] if args is None else args
    if not isinstance(args, (list, tuple)):
        return True
    return any(str(a).split("=")[0] in _DOC_FLAGS for a in args)


# Config keys that say where a run lives or how it was started, not what it computes: a rerun may change them.
NOT_THE_RUN = ("ckpt_path", "config", "trainer.logger.init_args.version", "trainer.logger.init_args.save_dir")
# Top-level options added after runs were made, with the value that leaves a run as it was: a config holding that
# value is the same run as one written before the option existed (reruns continue it, grid cells keep their keys).
NEUTRAL_DEFAULTS: dict[str, tuple[Any, ...]] = {"extra_question_sets": ([], None), "backend": (None,)}


def without_neutral_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without the :data:`NEUTRAL_DEFAULTS` entries that hold a neutral value, at the top level and in
    each callback's ``init_args`` (a linked option is also a callback argument); the input is not changed."""

    def strip(args: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in args.items() if not (k in NEUTRAL_DEFAULTS and v in NEUTRAL_DEFAULTS[k])}

    out = strip(config)
    trainer = out.get("trainer")
    if isinstance(trainer, dict) and isinstance(trainer.get("callbacks"), list):
        callbacks = [
            {**c, "init_args": strip(c["init_args"])}
            if isinstance(c, dict) and isinstance(c.get("init_args"), dict)
            else c
            for c in trainer["callbacks"]
        ]
        out["trainer"] = {**trainer, "callbacks": callbacks}
    return out


_INTERVENTIONS_HELP = (
    "What every Evaluate callback also evaluates under, beside the unchanged baseline (piggy_lightning.interventions: "
    "PrefixKVSplice, QueryControl, ActivationPatch, ResidualSweep, Perturb, ...); presets append with interventions+:"
)
_EXTRA_SETS_HELP = (
    "Question sets every Evaluate callback asks after its own question_sets, as groups of their own (e.g. "
    "piggy_lightning.evaluation.DomainFrame, TrainingFormat, WithSystemPrompt); presets append with "
    "extra_question_sets+:"
)
# Loggers whose directory is <save_dir>/<name>/version_N (Lightning numbers them; ModelCheckpoint saves inside).
VERSIONED_LOGGERS = ("TensorBoardLogger", "CSVLogger")


def _trainer_defaults() -> dict:
    """TensorBoard logging unless a config says otherwise, and two callbacks every CLI trainer has (Lightning adds
    ``trainer_defaults`` callbacks to the configured ones; they are not in ``config.yaml``): the learning-rate monitor
    and Lightning's ``ThroughputMonitor``, whose items are non-padding tokens, so it logs ``train/device/items_per_sec``
    (tokens per second on one rank; ``train/items_per_sec`` over all ranks under DDP) and ``.../samples_per_sec``
    over the last 2 batches, i.e. between consecutive steps, with the running totals (``train/lengths``, ...)."""
    throughput = lazy_instance(ThroughputMonitor, batch_size_fn=batch_size, length_fn=batch_tokens, window_size=2)
    return {
        "logger": lazy_instance(TensorBoardLogger, save_dir="runs", name="piggy", default_hp_metric=False),
        "callbacks": [lazy_instance(LearningRateMonitor, logging_interval="step"), throughput],
    }


def _plain(tree: Any) -> Any:
    """``tree`` without None values (the saved file keeps them, a dump may drop them)."""
    if isinstance(tree, dict):
        return {k: _plain(v) for k, v in tree.items() if v is not None}
    if isinstance(tree, list):
        return [_plain(v) for v in tree]
    return tree


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are values."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys in which two configs (as loaded from YAML) differ, ignoring :data:`NOT_THE_RUN` and the
    :data:`NEUTRAL_DEFAULTS` at their neutral value."""
    a = _flat(_plain(without_neutral_defaults(saved or {})))
    b = _flat(_plain(without_neutral_defaults(current or {})))
    ignored = [k for k in a.keys() | b.keys() if any(k == p or k.startswith(p + ".") for p in NOT_THE_RUN)]
    return sorted(k for k in a.keys() | b.keys() if k not in ignored and a.get(k) != b.get(k))


def _read_config(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


class RunConfig(SaveConfigCallback):
    """Writes the run's ``config.yaml``, and lets a rerun into the same directory proceed only with the same config.

    Lightning's ``SaveConfigCallback`` refuses any directory that has a ``config.yaml`` (or, with
    ``overwrite=True``, silently replaces it). A rerun that continues a run must reuse its directory, so an equal
    config (see :func:`config_differences`) is accepted and the file kept; a different one is refused with the
    directory and the differing keys, because its checkpoints and evaluation files belong to another experiment.
    Arguments as in ``SaveConfigCallback``.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved or not self.save_to_log_dir:
            return super().setup(trainer, pl_module, stage)
        log_dir = trainer.log_dir  # a broadcast: on every rank
        path = Path(log_dir) / self.config_filename
        differences = None
        if trainer.is_global_zero and path.is_file():
            current = yaml.safe_load(self.parser.dump(self.config))
            differences = config_differences(_read_config(path), current)
        differences = trainer.strategy.broadcast(differences)
        if differences is None:
            return super().setup(trainer, pl_module, stage)
        if differences:
            shown = ", ".join(differences[:8]) + (", ..." if len(differences) > 8 else "")
            raise RuntimeError(
                f"{log_dir} holds a run with another config ({path} differs in {shown}); its checkpoints and "
                "evaluation files are not this run's. Leave trainer.logger.init_args.version unset (a new "
                "version_N is made) or name another version"
            )
        self.already_saved = True  # the same run continues: its config.yaml stays


class PiggyCLI(LightningCLI):
    """LightningCLI whose data module always receives the model's tokenizer settings, and whose fit continues the
    run with the same config (see the module docstring).

    Attributes:
        continued_run: The existing run directory this fit continues, or None for a new run. With ``run=False``
            pass ``ckpt_path="last"`` to ``trainer.fit`` to resume from it.
    """

    continued_run: Path | None = None

    def __init__(self, *args, **kwargs) -> None:
        # Attribute docstrings (documented dataclass fields such as PatchSite's) take about 0.6 s to parse at every
        # start (measured: 1.1 s -> 0.5 s of parsing and instantiation for the main config) and are only shown by
        # --help and --print_config, so they are parsed only then.
        set_parsing_settings(docstring_parse_attribute_docstrings=_wants_docs(kwargs.get("args")))
        kwargs.setdefault("model_class", PiggyModule)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", RunConfig)
        kwargs.setdefault("auto_configure_optimizers", False)  # PiggyModule owns optimizer + scheduler options
        kwargs.setdefault("trainer_defaults", _trainer_defaults())
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Values that must agree between model and data are linked, never repeated.
        parser.link_arguments("model.model_name_or_path", "data.init_args.tokenizer")
        parser.link_arguments("model.gguf_file", "data.init_args.gguf_file")
        parser.link_arguments("model.chat_template_kwargs", "data.init_args.chat_template_kwargs")
        parser.link_arguments("model.postfix_exclude", "data.init_args.postfix_exclude")
        # Interventions are listed once, at the top level, and reach every Evaluate callback: a stacked preset
        # appends with `interventions+:` (a config file cannot edit one item of trainer.callbacks).
        parser.add_argument("--interventions", type=list[Intervention], default=[], help=_INTERVENTIONS_HELP)
        parser.link_arguments("interventions", "trainer.callbacks.init_args.interventions")
        # The same for question sets that only add groups (conditional-misalignment triggers): `extra_question_sets+:`
        parser.add_argument("--extra_question_sets", type=list[QuestionSet], default=[], help=_EXTRA_SETS_HELP)
        parser.link_arguments("extra_question_sets", "trainer.callbacks.init_args.extra_question_sets")

    def before_instantiate_classes(self) -> None:
        """Point an unversioned logger of a fit at the newest run directory holding the same config, if any."""
        if self.subcommand not in (None, "fit"):
            return  # validate/test/predict make a new directory, as in Lightning
        config = self.config[self.subcommand] if self.subcommand else self.config
        logger = config.get("trainer", Namespace()).get("logger")
        if not isinstance(logger, Namespace) or not str(logger.get("class_path")).endswith(VERSIONED_LOGGERS):
            return
        args = logger.get("init_args") or Namespace()
        if args.get("version") is not None or args.get("save_dir") is None:
            return  # a fixed directory: RunConfig refuses it if it holds another config
        current = yaml.safe_load(self._parser(self.subcommand).dump(config))
        runs = Path(args.save_dir) / str(args.get("name") or "")
        numbered = [(m, p) for p in runs.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
        for number, run in sorted(((int(m.group(1)), p) for m, p in numbered), reverse=True):
            saved = run / str(args.get("sub_dir") or "") / "config.yaml"
            if saved.is_file() and not config_differences(_read_config(saved), current):
                args.version = number
                self.continued_run = run
                rank_zero_info(f"{run} holds a run with this config: continuing it there")
                return

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, with every ``ModelCheckpoint`` whose ``save_last`` is unset keeping ``last.ckpt`` (the
        checkpoint a rerun resumes from)."""
        trainer = super().instantiate_trainer(**kwargs)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last is None:
                callback.save_last = True
        self._check_links_reach_an_evaluate(trainer)
        return trainer

    def _check_links_reach_an_evaluate(self, trainer: Trainer) -> None:
        """Refuse top-level ``interventions`` or ``extra_question_sets`` when no ``Evaluate`` callback receives them
        (they would do nothing)."""
        from piggy_lightning.callbacks import Evaluate

        config = self.config[self.subcommand] if self.subcommand else self.config
        for key in ("interventions", "extra_question_sets"):
            wanted = config.get(key) or []
            if wanted and not any(isinstance(c, Evaluate) for c in trainer.callbacks):
                names = [
                    str(i.get("class_path", i)).rsplit(".", 1)[-1] if isinstance(i, Namespace) else str(i)
                    for i in wanted
                ]
                raise ValueError(
                    f"{key} {names} are configured but no Evaluate callback is in trainer.callbacks to run them; "
                    f"add piggy_lightning.callbacks.Evaluate (with question sets and judges) or drop the {key}"
                )

    def before_fit(self) -> None:
        """A plain rerun of a run resumes it: ``ckpt_path`` None becomes ``last`` (Lightning warns if none is saved)."""
        if self.continued_run is not None and self.config_init.fit.get("ckpt_path") is None:
            self.config_init.fit.ckpt_path = "last"
