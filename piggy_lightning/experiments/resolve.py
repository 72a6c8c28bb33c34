"""Resolve a cell into one complete config file, the way ``main.py fit`` would read it, and key it.

Resolution uses the project's own parser (:class:`~piggy_lightning.cli.PiggyCLI` with instantiation switched
off), so a cell's file is exactly what ``main.py fit --config <base> --config <overlays...>`` would run, defaults
included, and every override is type-checked before any cell starts. The key is a hash of that file without the
keys that say where a run lives (:data:`~piggy_lightning.cli.NOT_THE_RUN`): a rerun of the grid skips a cell whose
key already finished, and a changed default, overlay or override gives a new key and a new cell directory.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from piggy_lightning.cli import NOT_THE_RUN, PiggyCLI, without_neutral_defaults
from piggy_lightning.experiments.spec import Cell, GridError, set_dotted


def _register_short_names() -> None:
    """Import the plugin packages, as ``main.py`` does, so their classes resolve by short name too."""
    import piggy_lightning.callbacks  # noqa: F401
    import piggy_lightning.data  # noqa: F401
    import piggy_lightning.evaluation  # noqa: F401
    import piggy_lightning.organism  # noqa: F401
    import piggy_lightning.regularizers  # noqa: F401


class _ParseOnly(PiggyCLI):
    """PiggyCLI that parses and checks a config but builds nothing, seeds nothing and looks for no run directory."""

    def _set_seed(self) -> None:
        pass

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


@functools.cache
def _parser() -> Any:
    """The project's ``fit`` parser, built once per process (building it is a third of a parse)."""
    _register_short_names()
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when `args` and a command line are both given
    try:  # any valid config builds it; the data module is the one required choice
        return _ParseOnly(run=False, args=["--data=piggy_lightning.data.ChatSFTDataModule"]).parser
    finally:
        sys.argv = argv


def _dump(config: Any) -> dict[str, Any]:
    return yaml.safe_load(_parser().dump(config, skip_check=True))  # parse_args/parse_object checked it


def parse_config(configs: list[str | Path]) -> dict[str, Any]:
    """The complete ``fit`` config that ``configs`` merge into, as plain YAML data (link targets omitted).

    Cells that share their config files (the seeds of a variant, the values of a sweep) share one parse: a
    process-wide cache keyed by each file's path, size and modification time, so an edited file is parsed again.
    """
    stamps = tuple((str(Path(c).resolve()), *_stamp(Path(c))) for c in configs)
    return copy.deepcopy(_parse_files(stamps))


def _stamp(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except OSError:
        return (-1, -1)  # the parser reports the missing file
    return (stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _parse_files(stamps: tuple[tuple[str, int, int], ...]) -> dict[str, Any]:
    return _dump(_parser().parse_args([a for path, *_ in stamps for a in ("--config", path)]))


def resolve_cell(cell: Cell, root: Path) -> dict[str, Any]:
    """The cell's complete config: its configs merged, then its overrides applied and checked by the parser.

    Args:
        cell: The cell.
        root: Directory the config paths are relative to.
    """
    try:
        tree = parse_config([root / c for c in cell.configs])
    except SystemExit as err:  # jsonargparse exits on a bad config; say which cell
        raise GridError(f"{cell.label}: its configs {list(cell.configs)} do not parse (see the message above)") from err
    if not cell.overrides:
        return tree
    for key, value in cell.overrides:
        set_dotted(tree, key, copy.deepcopy(value), cell.label)  # the grid's values are shared by its cells
    try:
        return _dump(_parser().parse_object(tree))  # the edited config checked and normalized like a file
    except SystemExit as err:
        raise GridError(f"{cell.label}: overrides {dict(cell.overrides)} give an invalid config (see above)") from err


def config_key(tree: dict[str, Any]) -> str:
    """Hex digest of a resolved config without the keys that only say where a run lives, and without options added
    later that hold their neutral value (:data:`~piggy_lightning.cli.NEUTRAL_DEFAULTS`), so cells keep their keys."""
    trimmed = without_neutral_defaults(json.loads(json.dumps(tree, default=str)))
    for dotted in NOT_THE_RUN:
        node: Any = trimmed
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return hashlib.sha256(json.dumps(trimmed, sort_keys=True).encode()).hexdigest()
