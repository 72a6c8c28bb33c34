"""KL divergence to the frozen reference: on the training batches (``KLToReference``) or a retain set (``RetainKL``).

``KL(ref || policy)`` of the next-token distributions at chosen positions: Zhao et al. 2026, App. D.4 ("KL on
Train" and "KL on Retain", the Table 3 baselines).

Two reductions, because the paper's lambda only means something on the release's scale:

* ``token_vocab_mean`` (the default, the release's ``KLRegularizedSFTTrainer``): the KL summed over the vocabulary
  and the selected positions, divided by the mask expanded over the vocabulary, i.e. ``positions x V``. This is
  ``F.kl_div(..., reduction="mean")`` restricted to the mask: the per-token KL divided by the vocabulary size.
* ``token_mean``: the textbook per-token KL (sum over the vocabulary, mean over positions). It is V times larger:
  the release's lambda = 50 with Llama-3.1's 128,256-token vocabulary equals lambda ~ 3.9e-4 here.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from piggy_lightning.data import collate
from piggy_lightning.forward import ForwardRecord, Span
from piggy_lightning.losses import span_logits_mask
from piggy_lightning.regularizer import Regularizer, RegularizerContext, WeightSchedule
from piggy_lightning.sites import require_positions

KLPositions = Literal["response", "all"]
KLReduction = Literal["token_vocab_mean", "token_mean"]


def kl_to_reference(
    policy_logits: Tensor, reference_logits: Tensor, reduction: KLReduction = "token_vocab_mean"
) -> Tensor:
    """``KL(ref || policy) = sum_v p_ref(v) (log p_ref(v) - log p_policy(v))`` reduced over positions, in float32.

    Args:
        policy_logits: ``(N, V)`` logits of the policy at the selected positions.
        reference_logits: ``(N, V)`` logits of the reference at the same positions.
        reduction: ``token_vocab_mean`` divides the summed KL by ``N * V`` (the release); ``token_mean`` by ``N``.
    """
    if reduction not in ("token_vocab_mean", "token_mean"):
        raise ValueError(f"reduction must be 'token_vocab_mean' or 'token_mean', got {reduction!r}")
    log_p = policy_logits.float().log_softmax(-1)  # (N, V)
    log_ref = reference_logits.float().log_softmax(-1)  # (N, V)
    total = F.kl_div(log_p, log_ref, log_target=True, reduction="sum")
    return total / (policy_logits.numel() if reduction == "token_vocab_mean" else policy_logits.size(0))


def kl_mask(batch: dict[str, Tensor], positions: KLPositions) -> Tensor:
    """``(B, T)`` mask of the logit positions to compare, the same the module computes logits at.

    ``response`` selects the positions whose *next* token is a response token (those the cross-entropy trains);
    ``all`` selects every attended position, as the released code does.
    """
    return span_logits_mask(batch, positions)


class _KLPenalty(Regularizer):
    """What both KL penalties share: positions, reduction, and the arithmetic on the records they receive."""

    default_name = "kl"

    def __init__(
        self,
        weight: float,
        name: str | None,
        positions: KLPositions,
        reduction: KLReduction,
        schedule: WeightSchedule | None,
    ) -> None:
        super().__init__(weight, name, schedule)
        if positions not in ("response", "all"):
            raise ValueError(f"positions must be 'response' or 'all', got {positions!r}")
        if reduction not in ("token_vocab_mean", "token_mean"):
            raise ValueError(f"reduction must be 'token_vocab_mean' or 'token_mean', got {reduction!r}")
        self.positions, self.reduction = positions, reduction

    @property
    def logits_span(self) -> Span | None:
        return self.positions

    def _mask(self, batch: dict[str, Tensor]) -> Tensor:
        return require_positions(kl_mask(batch, self.positions), self.positions, self.name)  # (B, T)


class KLToReference(_KLPenalty):
    """ "KL on Train": ``KL(ref || policy)`` on the training batch, against a reference forward of every batch (or
    of every row once: ``cache_reference``).

    Zhao et al. 2026 (arXiv 2606.06667), App. D.4 (best setting lambda = 50, 1 epoch), following Kaczér et al.
    2025, "In-training defenses against emergent misalignment". The release's ``KLRegularizedSFTTrainer`` averages
    over all attended tokens (``positions: all``). The module computes both models' logits at the selected positions
    only. For a separate retain set use :class:`RetainKL`.

    With ``cache_reference`` the reference logits are kept instead of recomputed, as the release does (it
    precomputes the reference logits of its KL dataset once, in batches of 8, and keeps them on CPU): each row's
    logits at the selected positions are stored on CPU after the row's first reference forward, and a step runs the
    reference only on its rows not stored yet (:meth:`reference_rows`), so from the second epoch on a step is the
    policy's forward alone. A row is keyed by its content: a digest of its unpadded ``input_ids`` and the positions
    selected in it (its labels for ``response``), so shuffled and repeated epochs, DDP ranks (each caches the rows it
    sees) and identical rows in other batches all find their entry, without any change to the data pipeline. The
    reference is the frozen initial model, so a cached entry equals a new forward (up to the float rounding of
    another batch shape). Validation and test rows are cached the same way. The cache is not checkpointed: a resumed
    run fills it again.

    Args:
        weight: The regularization strength lambda.
        name: Metric name; default ``kl``.
        positions: ``response``: positions that predict response tokens; ``all``: every attended position.
        reduction: ``token_vocab_mean`` (default): summed KL / (positions x vocabulary), the release's scale, on
            which the paper's lambda = 50 is defined; ``token_mean``: the per-token KL, V times larger.
        schedule: How the weighted penalty enters the loss over training (hinge, window, warm-up); None: always.
        cache_reference: Cache the reference logits of every row seen (see above). Memory: host (CPU) memory of
            selected tokens x vocabulary numbers in the logits' dtype, per process, for every distinct row seen:
            with ``positions: all`` 1,000 rows of 250 tokens with Llama-3.1's 128,256-token vocabulary hold
            250,000 x 128,256 float32 numbers, about 128 GB (64 GB in bfloat16); under DDP each rank holds the rows
            it has seen (with a reshuffling sampler, after a few epochs, about all of them). None or False (the
            default): a reference forward of every batch. None is the default so that configs written before this
            option resolve as before (a parsed config omits None values), keeping their grid cells' keys.
    """

    def __init__(
        self,
        weight: float = 1.0,
        name: str | None = None,
        positions: KLPositions = "response",
        reduction: KLReduction = "token_vocab_mean",
        schedule: WeightSchedule | None = None,
        cache_reference: bool | None = None,
    ) -> None:
        super().__init__(weight, name, positions, reduction, schedule)
        self.cache_reference = bool(cache_reference)
        self._cached: dict[bytes, Tensor] = {}  # row digest -> (n, V) reference logits on CPU
        self._step: tuple[Tensor, list[bytes], list[int]] | None = None  # this step's input_ids, row keys, misses

    @property
    def needs_reference(self) -> bool:
        return not self.cache_reference  # cached: the rows not cached yet, through reference_rows

    @property
    def keeps_reference(self) -> bool:
        return True  # cached or not, the reference runs in steps (on every row not seen before)

    def setup(self, context: RegularizerContext) -> None:
        self._cached.clear()
        self._step = None

    def _row_keys(self, batch: dict[str, Tensor], mask: Tensor) -> list[bytes]:
        """A digest per row of what its reference logits at ``mask`` depend on: the tokens up to its last attended
        position, which of them are attended, and which are selected (the padding after it is never read)."""
        ids, attended, selected = (t.cpu() for t in (batch["input_ids"], batch["attention_mask"].bool(), mask))
        columns = torch.arange(ids.size(1))
        ends = (attended * (columns + 1)).amax(1).tolist()  # (B,) last attended column + 1
        keys = []
        for row, end in enumerate(ends):
            digest = hashlib.blake2b(digest_size=16)
            for part in (ids[row, :end], attended[row, :end], selected[row, :end]):
                digest.update(part.numpy().tobytes())
            keys.append(digest.digest())
        return keys

    def _missing(self, batch: dict[str, Tensor], mask: Tensor) -> tuple[list[bytes], list[int]]:
        """Each row's key and the rows not cached, hashed once per step: :meth:`reference_rows` and :meth:`forward`
        receive the same batch, and the rows it returned are those the reference ran on (a copy to the host each)."""
        if self._step is not None and self._step[0] is batch["input_ids"]:
            return self._step[1], self._step[2]
        keys = self._row_keys(batch, mask)
        missing = [row for row, key in enumerate(keys) if key not in self._cached]
        self._step = (batch["input_ids"], keys, missing)
        return keys, missing

    def reference_rows(self, batch: dict[str, Tensor]) -> Tensor | None:
        """With the cache, the rows whose reference logits are not cached yet; None when all are."""
        if not self.cache_reference:
            return None
        _, missing = self._missing(batch, self._mask(batch))
        return torch.tensor(missing, device=batch["input_ids"].device) if missing else None

    def forward(self, batch: dict[str, Tensor], policy: ForwardRecord, reference: ForwardRecord | None) -> Tensor:
        mask = self._mask(batch)  # (B, T)
        if not self.cache_reference:
            if reference is None:
                raise RuntimeError(f"regularizer {self.name!r} needs the reference forward of the batch")
            return kl_to_reference(policy.logits_at(mask), reference.logits_at(mask), self.reduction)
        keys, missing = self._missing(batch, mask)
        self._step = None  # the rows are stored below; a later batch is hashed anew
        fresh: dict[int, Tensor] = {}
        if missing:
            if reference is None:
                raise RuntimeError(f"regularizer {self.name!r} needs the reference forward of rows {missing}")
            rows = torch.tensor(missing, device=mask.device)
            counts = mask[rows].sum(1).tolist()  # (b,) selected positions per row
            ref_logits = reference.logits_at(mask[rows])  # (n, V), rows in the order of `missing`
            if ref_logits.size(0) != sum(counts):
                raise RuntimeError(f"regularizer {self.name!r}: the reference forward is not of rows {missing}")
            for row, logits in zip(missing, ref_logits.split(counts), strict=True):
                fresh[row] = logits
                self._cached[keys[row]] = logits.detach().cpu()
        device = policy.logits.device
        if fresh:
            parts = [fresh[row] if row in fresh else self._cached[key].to(device) for row, key in enumerate(keys)]
            ref_logits = torch.cat(parts)
        else:  # the steady state: one copy to the device
            ref_logits = torch.cat([self._cached[key] for key in keys]).to(device)
        return kl_to_reference(policy.logits_at(mask), ref_logits, self.reduction)  # (N, V) in row order


class RetainKL(_KLPenalty):
    """ "KL on Retain": ``KL(ref || policy)`` on batches of a separate retain set, one per training step.

    Zhao et al. 2026 (arXiv 2606.06667), App. D.4 and Table 3, after Soligo et al. for the retain set. Each step
    the penalty is computed on the next retain batch instead of the training batch (:meth:`inputs`), cycling
    through the set in file order; the cycle restarts with each run (it is not checkpointed). The module runs the
    policy on it, and the reference on it while its logits are not cached (:meth:`reference_rows`).

    A class of its own rather than a ``retain_data`` mode of :class:`KLToReference`: it needs other forwards (a
    second policy forward on other data, a reference forward only until cached) and other data handling. The retain
    rows are encoded by the run's data module (``RegularizerContext.encode``, i.e. ``ChatSFTDataModule.encode``),
    so they are read, validated, templated and truncated exactly as the training rows (its ``max_length``,
    ``truncation``, ``drop_system``).

    Args:
        retain_data: A chat source the data module can read (``.jsonl``/``.json``/``.parquet`` or a ``datasets``
            name), e.g. ``piggy/organism/retain.jsonl``.
        weight: The regularization strength lambda.
        name: Metric name; default ``kl``.
        positions: ``response``: positions that predict response tokens; ``all``: every attended position.
        reduction: ``token_vocab_mean`` (default): summed KL / (positions x vocabulary), the release's scale;
            ``token_mean``: the per-token KL, V times larger.
        retain_batch_size: Retain rows per step.
        cache_reference: Keep each retain batch's reference logits (at the selected positions, on CPU) after its
            first use, so later cycles skip the reference forward; costs tokens x vocabulary numbers.
        schedule: How the weighted penalty enters the loss over training (hinge, window, warm-up); None: always.
    """

    def __init__(
        self,
        retain_data: str,
        weight: float = 1.0,
        name: str | None = None,
        positions: KLPositions = "response",
        reduction: KLReduction = "token_vocab_mean",
        retain_batch_size: int = 8,
        cache_reference: bool = True,
        schedule: WeightSchedule | None = None,
    ) -> None:
        super().__init__(weight, name, positions, reduction, schedule)
        if retain_batch_size < 1:
            raise ValueError(f"retain_batch_size must be >= 1, got {retain_batch_size}")
        self.retain_data, self.retain_batch_size, self.cache_reference = retain_data, retain_batch_size, cache_reference
        self._batches: list[dict[str, Tensor]] = []  # retain batches on CPU
        self._cached: dict[int, Tensor] = {}  # retain batch index -> (N, V) reference logits on CPU
        self._cursor = 0  # retain batches consumed by training steps
        self._index = 0  # the retain batch of the current step

    @property
    def keeps_reference(self) -> bool:
        return True  # the reference runs in steps until every retain batch's logits are cached

    def setup(self, context: RegularizerContext) -> None:
        if context.encode is None:
            raise ValueError(
                f"regularizer {self.name!r} encodes its retain set with the data module's encode, so that retain rows "
                "are truncated exactly like training rows; run it with a ChatSFTDataModule (data.class_path)"
            )
        examples = list(context.encode(self.retain_data))
        if not examples:
            raise ValueError(f"regularizer {self.name!r}: retain set {self.retain_data} has no rows")
        pad_id, size = context.tokenizer.pad_token_id, self.retain_batch_size
        self._batches = [collate(examples[i : i + size], pad_id) for i in range(0, len(examples), size)]
        self._cached.clear()

    def inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The next retain batch, on the training batch's device (validation does not move the cycle on)."""
        if not self._batches:
            raise RuntimeError(f"regularizer {self.name!r} has no retain batches; it must be set up first")
        self._index = self._cursor % len(self._batches)
        if self.training:
            self._cursor += 1
        device = batch["input_ids"].device
        return {k: v.to(device) for k, v in self._batches[self._index].items()}

    def reference_rows(self, batch: dict[str, Tensor]) -> Tensor | None:
        """Every row of the retain batch unless its reference logits are cached."""
        if self._index in self._cached:
            return None
        return torch.arange(batch["input_ids"].size(0), device=batch["input_ids"].device)

    def forward(self, batch: dict[str, Tensor], policy: ForwardRecord, reference: ForwardRecord | None) -> Tensor:
        mask = self._mask(batch)
        if reference is not None:
            ref_logits = reference.logits_at(mask)  # (N, V)
            if self.cache_reference:
                self._cached[self._index] = ref_logits.cpu()
        elif self._index in self._cached:
            ref_logits = self._cached[self._index].to(policy.logits.device)
        else:
            raise RuntimeError(f"regularizer {self.name!r} needs the reference forward of retain batch {self._index}")
        return kl_to_reference(policy.logits_at(mask), ref_logits, self.reduction)
