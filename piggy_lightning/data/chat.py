"""The chat-SFT DataModule base: read, validate, template, tokenize (once, cached on disk), split, pad and batch.

A batch is a ``dict[str, Tensor]`` with right padding:

* ``input_ids``, ``attention_mask``: ``(B, T)``;
* ``labels``: ``(B, T)`` token ids on response tokens, -100 elsewhere (loss on responses only);
* ``prefix_mask``, ``query_mask``, ``postfix_mask``, ``response_mask``: ``(B, T)`` booleans (see ``spans.py``).

Callbacks that touch batches replace values by key and never rebind the dict. Narrow tasks are thin subclasses
that set their default files and a ``version`` string, logged with the hyperparameters so that a change in data
processing shows in the run's ``hparams.yaml``.

Tokenization runs once per source: ``prepare_data`` (one process per node, before any ``setup``) encodes the
training and validation sources with ``datasets.map`` into the on-disk cache of ``cache.py``, and ``setup`` on every
rank loads them from it; a later run with the same data, tokenizer, template and settings tokenizes nothing. The
training loader is a ``StatefulDataLoader`` whose position Lightning checkpoints (``sampling.py``).
"""

from __future__ import annotations

import logging
import warnings
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from piggy_lightning.data.cache import (
    SPAN_LABELS,
    cache_root,
    entry_key,
    load_entry,
    save_entry,
    to_examples,
    tokenize_rows,
)
from piggy_lightning.data.io import DataError, read_chats
from piggy_lightning.data.sampling import EpochShuffle
from piggy_lightning.modeling import load_tokenizer
from piggy_lightning.spans import SPAN_NAMES, ChatSpans, TokenizedChat

log = logging.getLogger(__name__)
Truncation = Literal["error", "truncate", "skip"]
# Share of query/response tokens that are the unknown token above which encoding warns: real text through a
# tokenizer built for other text (e.g. the organism's word-level vocabulary) becomes mostly unknown tokens.
UNK_WARN_SHARE = 0.05
_SPAN_CODE = {label: code for code, label in enumerate(SPAN_LABELS)}


def collate(examples: list[TokenizedChat], pad_id: int) -> dict[str, Tensor]:
    """Right-pad tokenized chats into a batch dict (see module docstring)."""
    width = max(len(e.input_ids) for e in examples)
    batch = {
        "input_ids": torch.full((len(examples), width), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(len(examples), width, dtype=torch.long),
        "labels": torch.full((len(examples), width), -100, dtype=torch.long),
    }
    batch.update({f"{name}_mask": torch.zeros(len(examples), width, dtype=torch.bool) for name in SPAN_NAMES})
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids = torch.tensor(example.input_ids, dtype=torch.long)
        batch["input_ids"][row, :n] = ids
        batch["attention_mask"][row, :n] = 1
        for name in SPAN_NAMES:
            batch[f"{name}_mask"][row, :n] = torch.tensor(example.mask(name))
        response = batch["response_mask"][row, :n]
        batch["labels"][row, :n] = torch.where(response, ids, torch.full_like(ids, -100))
    return batch


def batch_size(batch: dict[str, Tensor]) -> int:
    """Examples in a batch (``ThroughputMonitor``'s ``batch_size_fn``)."""
    return batch["input_ids"].size(0)


def batch_tokens(batch: dict[str, Tensor]) -> int:
    """Non-padding tokens in a batch (``ThroughputMonitor``'s ``length_fn``: its items are tokens)."""
    return int(batch["attention_mask"].sum())


class ChatSFTDataModule(L.LightningDataModule):
    """Supervised finetuning on chat rows with token-level span masks.

    Args:
        train_data: A ``.jsonl``/``.json``/``.parquet`` file or a ``datasets`` name with ``{"messages": [...]}`` rows;
            None uses the task's shipped organism file (``default_train_data``).
        val_data: A separate validation source; when None, ``val_fraction`` of ``train_data`` is held out.
        tokenizer: Tokenizer id or directory (linked to ``model.model_name_or_path`` by the CLI).
        gguf_file: GGUF file name when the tokenizer comes from a GGUF checkpoint (linked to the model's).
        chat_template_kwargs: Extra ``apply_chat_template`` arguments (linked to the model's).
        postfix_exclude: Template text ending a postfix that is labelled ``other`` (linked to the model's).
        drop_system: Drop system messages so the template's default system prompt is used (the paper's setting).
        val_fraction: Share of training rows held out for validation when ``val_data`` is None.
        seed: Seed of the train/validation split and of the per-epoch shuffle.
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
        train_data: str | None = None,
        val_data: str | None = None,
        tokenizer: str = "piggy/organism",
        gguf_file: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        postfix_exclude: str | None = None,
        drop_system: bool = True,
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
        if train_data is None:
            raise ValueError(f"{type(self).__name__} needs train_data (a file or a datasets name)")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.hparams["train_data"] = train_data
        self.hparams["version"] = self.version
        self.train_set: list[TokenizedChat] | None = None
        self.val_set: list[TokenizedChat] = []
        self.tokenizer = None
        self.spans: ChatSpans | None = None
        self._train_loader: StatefulDataLoader | None = None
        self._resume_position: dict[str, Any] | None = None  # a checkpoint's loader state, for the next loader
        self.stats: dict[str, int] = {}

    def encode(self, source: str) -> list[TokenizedChat]:
        """Read, validate, template and tokenize ``source`` with this module's settings (after ``setup``).

        Callbacks and regularizers that bring extra data (e.g. ``DataInterleaving``'s retain set) use this, so every
        file is processed exactly like the training data. The rows are read and validated on every call (errors
        name file, row and field); their tokens come from the on-disk cache (``cache.py``), and only a source not
        in it is tokenized, with ``datasets.map``. Rows whose default-prompt prefix tokenizes differently from the
        template's (see :meth:`_prefix_problem`) raise here, where file and row are known, rather than later in a
        prefix regularizer; a high share of unknown tokens is logged as a warning, from the cache too.
        """
        if self.spans is None:
            raise RuntimeError(f"{type(self).__name__}.encode needs setup() first (it loads the tokenizer)")
        hp = self.hparams
        chats, read = read_chats(source, skip_invalid=hp.skip_invalid)
        settings = {k: hp[k] for k in ("chat_template_kwargs", "postfix_exclude", "drop_system", "max_length")}
        settings.update(truncation=hp.truncation, skip_invalid=hp.skip_invalid, version=self.version)
        path = cache_root(hp.get("cache_dir")) / entry_key(chats, read.rows, self.tokenizer, settings)
        entry = load_entry(path)
        if entry is None:
            entry = tokenize_rows(source, chats, read.rows, partial(self._encode_row, source))
            if entry[1]["kept"]:
                save_entry(path, *entry)
        table, report = entry
        examples = to_examples(table)
        self.stats[source] = len(examples)
        self._warn(source, report, len(read.skipped))
        if not examples:
            raise ValueError(f"{source}: no usable rows")
        return examples

    def _encode_row(self, source: str, example: dict[str, Any]) -> dict[str, Any]:
        """Template and tokenize one validated row (``datasets.map``'s function); ``status`` is ``kept``,
        ``truncated``, ``dropped`` or ``misfit`` (skipped, see :meth:`_prefix_problem`)."""
        hp = self.hparams
        row, messages = example["row"], example["messages"]
        out = {"input_ids": [], "spans": [], "status": "kept", "field": "", "problem": "", "n_unk": 0, "n_text": 0}
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        if hp.drop_system:
            messages = [m for m in messages if m["role"] != "system"]
        chat = self.spans.tokenize(messages)
        if not any(m["role"] == "system" for m in messages):
            problem = self._prefix_problem(chat)
            if problem is not None:
                error = DataError(source, row, f"messages[{first_user}].content", problem)
                if not hp.skip_invalid:
                    raise error
                return {**out, "status": "misfit", "field": error.field, "problem": problem}
        unk_id = self.tokenizer.unk_token_id
        if unk_id is not None:
            text = [t for t, s in zip(chat.input_ids, chat.spans, strict=True) if s in ("query", "response")]
            out.update(n_unk=text.count(unk_id), n_text=len(text))
        if len(chat.input_ids) > hp.max_length:
            if hp.truncation == "error":
                raise ValueError(f"{source}, row {row}: {len(chat.input_ids)} tokens exceed max_length={hp.max_length}")
            if hp.truncation == "skip" or "response" not in chat.spans[: hp.max_length]:
                return {**out, "status": "dropped"}
            chat = TokenizedChat(chat.input_ids[: hp.max_length], chat.spans[: hp.max_length])
            out["status"] = "truncated"
        return {**out, "input_ids": chat.input_ids, "spans": [_SPAN_CODE[s] for s in chat.spans]}

    def _warn(self, source: str, report: dict[str, Any], n_read_skipped: int) -> None:
        """Log what encoding ``source`` did not keep as is (also when its tokens come from the cache)."""
        n_unk, n_text = report["n_unk"], report["n_text"]
        if n_text and n_unk / n_text > UNK_WARN_SHARE:
            unk = self.tokenizer.unk_token
            log.warning(
                "%s: %.1f%% of query and response tokens (%d of %d) are the unknown token %r: the tokenizer's "
                "vocabulary does not cover this text, so the model sees %r in place of those words",
                source, 100 * n_unk / n_text, n_unk, n_text, unk, unk,
            )  # fmt: skip
        misfits = [DataError(source, row, field, problem) for row, field, problem in report["misfits"]]
        skipped = n_read_skipped + len(misfits)
        if report["truncated"] or report["dropped"] or skipped:
            log.warning(
                "%s: %d rows kept, %d truncated, %d over max_length dropped, %d invalid skipped%s",
                source, report["kept"], report["truncated"], report["dropped"], skipped,
                "".join(f"\n  skipped: {e}" for e in misfits[:5]),  # read_chats logged its own skips
            )  # fmt: skip

    def _prefix_problem(self, chat: TokenizedChat) -> str | None:
        """Why a row without a system message does not start with the template's default prefix, or None.

        Every default-prompt row should carry ``spans.anatomy.prefix_ids``; on a BPE tokenizer, user content
        that starts with whitespace (a blank line) merges with the user header's last token and shifts the
        boundary, which prefix regularizers and drift monitors would otherwise report as a custom system prompt.
        """
        expected = self.spans.anatomy.prefix_ids
        prefix = tuple(t for t, s in zip(chat.input_ids, chat.spans, strict=True) if s == "prefix")
        if prefix == expected:
            return None
        pairs = zip(prefix, expected, strict=False)
        pos = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(prefix), len(expected)))
        decode = self.tokenizer.decode
        got = decode([chat.input_ids[pos]]) if pos < len(chat.input_ids) else "<end>"
        want = decode([expected[pos]]) if pos < len(expected) else "<end of prefix>"
        return (
            f"the prompt prefix differs from the template's default prefix at token {pos}: {got!r} where the "
            f"template has {want!r} ({len(prefix)} prefix tokens, expected {len(expected)}); user content that "
            "starts with whitespace merges with the user header, so strip leading whitespace from the user turn"
        )

    def _load_encoder(self) -> None:
        if self.spans is None:
            hp = self.hparams
            self.tokenizer = load_tokenizer(hp.tokenizer, hp.gguf_file)
            self.spans = ChatSpans(self.tokenizer, hp.chat_template_kwargs, postfix_exclude=hp.postfix_exclude)

    def prepare_data(self) -> None:
        """Tokenize the training and validation sources into the cache, once per node before any rank's ``setup``."""
        self._load_encoder()
        for source in (self.hparams.train_data, self.hparams.val_data):
            if source is not None:
                self.encode(source)

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenizer and the encoded sources (from the cache ``prepare_data`` filled; encoded here when it
        was not called, e.g. outside a trainer), then split off the validation rows."""
        if self.train_set is not None:
            return
        hp = self.hparams
        self._load_encoder()
        examples = self.encode(hp.train_data)
        if hp.val_data is not None:
            self.train_set, self.val_set = examples, self.encode(hp.val_data)
            return
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(hp.seed)).tolist()
        n_val = int(round(len(examples) * hp.val_fraction))
        self.val_set = [examples[i] for i in order[:n_val]]
        self.train_set = [examples[i] for i in sorted(order[n_val:])]

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
