"""``PiggyCLI``: LightningCLI with the project's parsing settings, argument links and defaults.

Run ``python main.py --help`` for the subcommands (fit, validate, test, predict) and
``python main.py fit --config configs/treft_legal.yaml --print_config=comments`` for every option with its
documentation. Class-typed options take a ``class_path`` (the class path is the registry; nothing else is).
"""

from __future__ import annotations

from docstring_parser import DocstringStyle
from jsonargparse import lazy_instance, set_parsing_settings
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from piggy_lightning.module import PiggyModule

set_parsing_settings(docstring_parse_style=DocstringStyle.GOOGLE, docstring_parse_attribute_docstrings=True)


def _trainer_defaults() -> dict:
    """TensorBoard logging and the learning-rate monitor unless a config says otherwise."""
    return {
        "logger": lazy_instance(TensorBoardLogger, save_dir="runs", name="piggy", default_hp_metric=False),
        "callbacks": [lazy_instance(LearningRateMonitor, logging_interval="step")],
    }


class PiggyCLI(LightningCLI):
    """LightningCLI whose data module always receives the model's tokenizer settings."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("model_class", PiggyModule)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)  # PiggyModule owns optimizer + scheduler options
        kwargs.setdefault("trainer_defaults", _trainer_defaults())
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Values that must agree between model and data are linked, never repeated.
        parser.link_arguments("model.model_name_or_path", "data.init_args.tokenizer")
        parser.link_arguments("model.gguf_file", "data.init_args.gguf_file")
        parser.link_arguments("model.chat_template_kwargs", "data.init_args.chat_template_kwargs")
        parser.link_arguments("model.postfix_exclude", "data.init_args.postfix_exclude")
