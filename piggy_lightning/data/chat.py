"""The chat-SFT DataModule base: read, validate, split, transform, template, tokenize (once, cached on disk), pad and
batch (the batch format is in ``batch.py``).

Narrow tasks are thin subclasses that set their default files and a ``version`` string, logged with the
hyperparameters so that a change in data processing shows in the run's ``hparams.yaml``.

The rows are prepared in this order: every training source is read and validated (``train_data`` may list several,
e.g. the four misaligned domains of a multi-domain run; every row keeps its source and row number, which errors
name); when ``val_data`` is None, ``val_fraction`` of *each* source is held out (seeded by ``seed``, so a source's
split does not depend on the others listed); then ``transforms`` (``transforms.py``: subsampling, noisy mixes,
system prompts) apply in order to the training rows, and the per-row ones to the validation rows too.

Tokenization runs once: ``prepare_data`` (one process per node, before any ``setup``) encodes the training and
validation rows with ``datasets.map`` into the on-disk cache of ``cache.py``, and ``setup`` on every rank loads them
from it; a later run with the same rows, tokenizer, template and settings tokenizes nothing. The training loader is
a ``StatefulDataLoader`` whose position Lightning checkpoints (``sampling.py``).
"""

from __future__ import annotations

import logging
import warnings
from functools import partial
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from piggy_lightning.data.batch import batch_size, batch_tokens, collate
from piggy_lightning.data.cache import encode_cached
from piggy_lightning.data.encoding import RowEncoder, Truncation
from piggy_lightning.data.io import ChatRow, read_rows
from piggy_lightning.data.sampling import EpochShuffle
from piggy_lightning.data.transforms import ChatTransform, TransformContext, apply_transforms, split_rows
from piggy_lightning.modeling import load_tokenizer
from piggy_lightning.spans import ChatSpans, TokenizedChat

__all__ = ["ChatSFTDataModule", "batch_size", "batch_tokens", "collate"]  # the batch helpers' former home
log = logging.getLogger(__name__)


def _listed(sources: str | list[str] | None) -> list[str]:
    return [] if sources is None else [sources] if isinstance(sources, str) else list(sources)


class ChatSFTDataModule(L.LightningDataModule):
    """Supervised finetuning on chat rows with token-level span masks.

    Args:
        train_data: A ``.jsonl``/``.json``/``.parquet`` file or a ``datasets`` name with ``{"messages": [...]}`` rows,
            or a list of them, trained on together (multi-domain EM); None uses the task's shipped organism file
            (``default_train_data``).
        val_data: A separate validation source (or list); when None, ``val_fraction`` of every ``train_data``
            source is held out.
        tokenizer: Tokenizer id or directory (linked to ``model.model_name_or_path`` by the CLI).
        gguf_file: GGUF file name when the tokenizer comes from a GGUF checkpoint (linked to the model's).
        chat_template_kwargs: Extra ``apply_chat_template`` arguments (linked to the model's).
        postfix_exclude: Template text ending a postfix that is labelled ``other`` (linked to the model's).
        drop_system: Drop the rows' own system messages so the template's default system prompt is used (the paper's
            setting); a system prompt set by a ``SystemPrompt`` transform is always kept.
        transforms: Steps applied in order to the validated training rows after the validation split and before
            tokenization (``piggy_lightning.data.Subsample``, ``NoisyMix``, ``SystemPrompt``; see ``transforms.py``).
        val_fraction: Share of each training source held out for validation when ``val_data`` is None.
        seed: Seed of the train/validation split, of the per-epoch shuffle and of transforms without their own.
        max_length: Maximum tokens per example.
        truncation: Over-long examples: ``error`` raises; ``truncate`` cuts the tail (a row left without response
            tokens is skipped and reported); ``skip`` drops the row and reports it.
        batch_size: Examples per micro-batch.
        num_workers: DataLoader worker processes.
        skip_invalid: Skip invalid rows (counted and reported) instead of raising.
        cache_dir: Directory of the tokenized-data cache; None uses ``$PIGGY_CACHE/tokenized`` (default
            ``~/.cache/piggy_lightning/tokenized``). See ``data/cache.py``.
    """

    version = "1"
    default_train_data: str | None = None

    def __init__(
        self,
        train_data: str | list[str] | None = None,
        val_data: str | list[str] | None = None,
        tokenizer: str = "piggy/organism",
        gguf_file: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        postfix_exclude: str | None = None,
        drop_system: bool = True,
        transforms: list[ChatTransform] | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        max_length: int = 2048,
        truncation: Truncation = "truncate",
        batch_size: int = 8,
        num_workers: int = 0,
        skip_invalid: bool = False,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        train_data = train_data or self.default_train_data
        if not train_data:
            raise ValueError(f"{type(self).__name__} needs train_data (a file or a datasets name, or a list of them)")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.transforms = list(transforms or [])
        for i, transform in enumerate(self.transforms):
            if not isinstance(transform, ChatTransform):
                raise TypeError(f"transforms[{i}] must be a ChatTransform, got {type(transform).__name__}")
        self.save_hyperparameters(ignore=["transforms"])  # plain data only: checkpoints load with weights_only
        self.hparams["train_data"] = train_data
        self.hparams["transforms"] = [t.config() for t in self.transforms]
        self.hparams["version"] = self.version
        self.train_set: list[TokenizedChat] | None = None
        self.val_set: list[TokenizedChat] = []
        self.train_rows: list[ChatRow] = []  # where train_set[i] came from (appended examples have no entry)
        self._read_skipped: dict[str, int] = {}  # invalid rows skipped per source, for the warnings
        self.tokenizer = None
        self.spans: ChatSpans | None = None
        self._encoder: RowEncoder | None = None
        self._train_loader: StatefulDataLoader | None = None
        self._resume_position: dict[str, Any] | None = None  # a checkpoint's loader state, for the next loader
        self.stats: dict[str, int] = {}

    def encode(self, source: str) -> list[TokenizedChat]:
        """Read, validate, template and tokenize ``source`` with this module's settings (after ``setup``).

        Callbacks and regularizers that bring extra data (e.g. ``DataInterleaving``'s retain set) use this, so every
        file is processed exactly like the training data. The rows are read and validated on every call (errors
        name file, row and field); their tokens come from the on-disk cache (``cache.py``), and only a source not
        in it is tokenized, with ``datasets.map``. Rows whose default-prompt prefix tokenizes differently from the
        template's (see :meth:`RowEncoder.prefix_problem`) raise here, where file and row are known, rather than
        later in a prefix regularizer; a high share of unknown tokens is logged as a warning, from the cache too.
        The ``transforms`` do not apply: they shape the training data only.
        """
        if self.spans is None:
            raise RuntimeError(f"{type(self).__name__}.encode needs setup() first (it loads the tokenizer)")
        examples, _ = self._encode_rows(self._read(source))
        return examples

    def _read(self, source: str) -> list[ChatRow]:
        """Read and validate ``source`` (errors name file, row and field), noting how many rows it skipped."""
        rows, report = read_rows(source, skip_invalid=self.hparams.skip_invalid)
        self._read_skipped[report.source] = len(report.skipped)
        return rows

    def _rows(self, announce: bool) -> tuple[list[ChatRow], list[ChatRow]]:
        """The training rows (split off and transformed) and the validation rows (see the module docstring); with
        ``announce``, the counts and what each transform did are printed (on global rank 0)."""
        hp = self.hparams
        train: list[ChatRow] = []
        val: list[ChatRow] = []
        for source in _listed(hp.train_data):
            rows = self._read(source)
            if hp.val_data is None:  # each source on its own: its split does not depend on the others listed
                rows, held_out = split_rows(rows, hp.val_fraction, hp.seed)
                val += held_out
            train += rows
        for source in _listed(hp.val_data):
            val += self._read(source)
        report = rank_zero_info if announce else log.debug
        context = TransformContext(read=self._read, held_out=val, seed=hp.seed, report=report)
        return apply_transforms(self.transforms, train, val, context)

    def _encode_rows(self, rows: list[ChatRow], **settings: Any) -> tuple[list[TokenizedChat], list[int]]:
        """Tokenize ``rows`` (from the cache when it holds them): the kept examples and their indices in ``rows``.

        ``settings`` join the encoding settings in the cache key (the training rows add their transforms).
        """
        hp = self.hparams
        settings.update({k: hp[k] for k in ("chat_template_kwargs", "postfix_exclude", "drop_system", "max_length")})
        settings.update(truncation=hp.truncation, skip_invalid=hp.skip_invalid, version=self.version)
        sources = list(dict.fromkeys(r.source for r in rows))
        label = ", ".join(sources) or str(hp.train_data)
        examples, positions, report = encode_cached(
            label, rows, self._encoder, self.tokenizer, settings, hp.get("cache_dir")
        )
        self.stats[label] = len(examples)
        self._encoder.warn(label, report, sum(self._read_skipped.get(s, 0) for s in sources))
        if not examples:
            raise ValueError(f"{label}: no usable rows")
        return examples, positions

    def _load_encoder(self) -> None:
        if self.spans is None:
            hp = self.hparams
            self.tokenizer = load_tokenizer(hp.tokenizer, hp.gguf_file)
            self.spans = ChatSpans(self.tokenizer, hp.chat_template_kwargs, postfix_exclude=hp.postfix_exclude)
            self._encoder = RowEncoder(self.spans, hp.drop_system, hp.max_length, hp.truncation, hp.skip_invalid)

    def _encode_split(self, announce: bool) -> tuple[list[TokenizedChat], list[TokenizedChat], list[ChatRow]]:
        """The training and validation examples, tokenized as one cache entry, and the training examples' rows."""
        self._load_encoder()
        train, val = self._rows(announce)
        examples, positions = self._encode_rows(train + val, transforms=self.hparams.transforms)
        n = len(train)
        train_set = [e for e, p in zip(examples, positions, strict=True) if p < n]
        val_set = [e for e, p in zip(examples, positions, strict=True) if p >= n]
        if not train_set:
            raise ValueError(f"{self.hparams.train_data}: no usable training rows")
        if val and not val_set:
            raise ValueError(f"{self.hparams.val_data or self.hparams.train_data}: no usable validation rows")
        return train_set, val_set, [train[p] for p in positions if p < n]

    def prepare_data(self) -> None:
        """Tokenize the training and validation rows into the cache, once per node before any rank's ``setup``."""
        self._encode_split(announce=False)

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenizer and the encoded rows (from the cache ``prepare_data`` filled; encoded here when it
        was not called, e.g. outside a trainer)."""
        if self.train_set is None:
            self.train_set, self.val_set, self.train_rows = self._encode_split(announce=True)

    def train_dataloader(self) -> StatefulDataLoader:
        """``train_set`` in :class:`EpochShuffle` order, split over the data-parallel ranks, from a
        ``StatefulDataLoader`` that starts at the position :meth:`load_state_dict` received, if any."""
        shards = (self.trainer.distributed_sampler_kwargs if self.trainer is not None else None) or {}
        with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, which torch 2.13 deprecates
            warnings.filterwarnings("ignore", "'set_vital' is deprecated", UserWarning)
            loader = StatefulDataLoader(
                self.train_set,
                batch_size=self.hparams.batch_size,
                sampler=EpochShuffle(self.train_set, self.hparams.seed, **shards),
                num_workers=self.hparams.num_workers,
                collate_fn=partial(collate, pad_id=self.tokenizer.pad_token_id),
            )
        if self._resume_position is not None:
            loader.load_state_dict(self._resume_position)
            self._resume_position = None
        self._train_loader = loader
        return loader

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position, saved in checkpoints beside the fit loop's copy of it.

        Lightning hands its copy to the loader only if the loader is built after the checkpoint restores the loops;
        ``PiggyModule`` builds it earlier, in ``configure_optimizers``, when a schedule asks for the trainer's step
        count (Lightning #20550). This copy is restored with the data module, before ``configure_optimizers`` (under
        strategies that restore checkpoints at setup: single device, DDP), and :meth:`train_dataloader` applies it.
        """
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_position = state_dict.get("train_loader")

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_set:
            return []
        pad_id = self.tokenizer.pad_token_id
        return DataLoader(
            self.val_set,
            batch_size=self.hparams.batch_size,
            num_workers=self.hparams.num_workers,
            collate_fn=partial(collate, pad_id=pad_id),
        )

    def test_dataloader(self) -> DataLoader | list:
        """The held-out split again: ``main.py test`` reports its loss next to the generation-based evaluation."""
        return self.val_dataloader()
