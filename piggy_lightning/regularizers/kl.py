"""KL divergence to the frozen reference, on the training batches or on a separate retain set.

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

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from piggy_lightning.data.chat import collate
from piggy_lightning.data.io import read_chats
from piggy_lightning.forward import ForwardRecord, Span, run_forward
from piggy_lightning.regularizer import Regularizer
from piggy_lightning.sites import require_positions
from piggy_lightning.spans import TokenizedChat

if TYPE_CHECKING:
    from piggy_lightning.module import PiggyModule
    from piggy_lightning.reference import Reference

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
    """``(B, T)`` mask of the logit positions to compare.

    ``response`` selects the positions whose *next* token is a response token (those the cross-entropy trains);
    ``all`` selects every attended position, as the released code does.
    """
    if positions == "all":
        return batch["attention_mask"].bool()
    mask = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)  # (B, T)
    mask[:, :-1] = batch["labels"][:, 1:] != -100
    return mask


@dataclass
class _Handles:
    """The module's networks, held outside ``nn.Module`` attributes so they are not registered as submodules."""

    policy: nn.Module
    reference: Reference


class KLToReference(Regularizer):
    """Penalise the KL divergence from the frozen reference to the policy, ``KL(ref || policy)``.

    Zhao et al. 2026 (arXiv 2606.06667), App. D.4 (best setting lambda = 50, 1 epoch), following Kaczér et al.
    2025, "In-training defenses against emergent misalignment", and Soligo et al. for the retain set. The
    release's ``KLRegularizedSFTTrainer`` averages over all attended tokens (``positions: all``).

    With ``retain_data`` unset this is "KL on Train": it compares the policy and reference forwards of the
    training batch (one reference forward per step). With ``retain_data`` it is "KL on Retain": each step runs
    the policy (and, unless cached, the reference) on the next batch of the retain set, cycling through it in
    file order; the cycle restarts with each run (it is not checkpointed).

    Args:
        weight: The regularization strength lambda.
        name: Metric name; default ``kl``.
        positions: ``response``: positions that predict response tokens; ``all``: every attended position.
        reduction: ``token_vocab_mean`` (default): summed KL / (positions x vocabulary), the release's scale, on
            which the paper's lambda = 50 is defined; ``token_mean``: the per-token KL, V times larger.
        retain_data: A chat file (``.jsonl``/``.json``/``.parquet``) or ``datasets`` name for "KL on Retain",
            read like the training data; None means "KL on Train".
        retain_batch_size: Retain rows per step.
        max_length: Retain rows longer than this are truncated to it.
        drop_system: Drop the retain rows' system messages, so the template's default system prompt is used.
        cache_reference: Keep each retain batch's reference logits (at the selected positions, on CPU) after
            its first use, so later cycles skip the reference forward; costs tokens x vocabulary numbers.
    """

    default_name = "kl"

    def __init__(
        self,
        weight: float = 1.0,
        name: str | None = None,
        positions: KLPositions = "response",
        reduction: KLReduction = "token_vocab_mean",
        retain_data: str | None = None,
        retain_batch_size: int = 8,
        max_length: int = 2048,
        drop_system: bool = True,
        cache_reference: bool = True,
    ) -> None:
        super().__init__(weight, name)
        if positions not in ("response", "all"):
            raise ValueError(f"positions must be 'response' or 'all', got {positions!r}")
        if reduction not in ("token_vocab_mean", "token_mean"):
            raise ValueError(f"reduction must be 'token_vocab_mean' or 'token_mean', got {reduction!r}")
        self.positions, self.reduction, self.retain_data = positions, reduction, retain_data
        self.retain_batch_size, self.max_length = retain_batch_size, max_length
        self.drop_system, self.cache_reference = drop_system, cache_reference
        self._handles: _Handles | None = None
        self._batches: list[dict[str, Tensor]] = []  # retain batches on CPU
        self._cached: dict[int, Tensor] = {}  # retain batch index -> (N, V) reference logits on CPU
        self._cursor = 0

    @property
    def needs_reference(self) -> bool:
        return self.retain_data is None

    @property
    def logits_span(self) -> Span | None:
        return self.positions if self.retain_data is None else None

    @property
    def keeps_reference(self) -> bool:
        return True  # the retain set runs the reference in steps too (until its logits are cached)

    def setup(self, module: PiggyModule) -> None:
        self._handles = _Handles(module.policy, module.reference)
        if self.retain_data is not None:
            self._batches = self._load_retain(module)

    def _load_retain(self, module: PiggyModule) -> list[dict[str, Tensor]]:
        chats, _ = read_chats(self.retain_data)
        examples = []
        for messages in chats:
            if self.drop_system:
                messages = [m for m in messages if m["role"] != "system"]
            chat = module.spans.tokenize(messages)
            examples.append(TokenizedChat(chat.input_ids[: self.max_length], chat.spans[: self.max_length]))
        if not examples:
            raise ValueError(f"regularizer {self.name!r}: retain set {self.retain_data} has no rows")
        pad_id = module.tokenizer.pad_token_id
        size = self.retain_batch_size
        return [collate(examples[i : i + size], pad_id) for i in range(0, len(examples), size)]

    def forward(self, batch: dict[str, Tensor], policy: ForwardRecord, reference: ForwardRecord | None) -> Tensor:
        if self.retain_data is None:
            if reference is None:
                raise RuntimeError(f"regularizer {self.name!r} needs the reference forward of the batch")
            mask = require_positions(kl_mask(batch, self.positions), self.positions, self.name)  # (B, T)
            return kl_to_reference(policy.logits_at(mask), reference.logits_at(mask), self.reduction)
        return self._retain_kl(device=batch["input_ids"].device)

    def _retain_kl(self, device: torch.device) -> Tensor:
        if self._handles is None or not self._batches:
            raise RuntimeError(f"regularizer {self.name!r} has no retain batches; call setup(module) first")
        index = self._cursor % len(self._batches)
        if self.training:  # validation reuses the current retain batch without moving the cycle on
            self._cursor += 1
        retain = {k: v.to(device) for k, v in self._batches[index].items()}
        mask = require_positions(kl_mask(retain, self.positions), self.positions, self.name)  # (B, T)

        logits = run_forward(self._handles.policy, retain, frozenset(), mask).logits  # (N, V) at mask only
        ref_logits = self._cached.get(index)
        if ref_logits is None:
            ref_logits = self._handles.reference.forward(retain, logits_mask=mask).logits  # (N, V)
            if self.cache_reference:
                self._cached[index] = ref_logits.cpu()
        return kl_to_reference(logits, ref_logits.to(device), self.reduction)
