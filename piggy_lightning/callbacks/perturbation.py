"""``TokenPerturbation``: evaluate with a prompt segment perturbed by embedding neighbours, or train with it.

Evaluation (paper §2, Table 1): every question is asked ``trials`` times, each time with ``n_tokens`` tokens of
the chosen segment replaced (:mod:`piggy_lightning.interventions.perturbation`); the trials sample as configured
(the release samples at temperature 0.7, top-p 0.9). Reported per group, next to Evaluate's usual metrics:

* **Best**: for each prompt (question and paraphrase) the maximum score over its trials, averaged over prompts;
* **Avg.**: the mean score over all trials and prompts (equal to the group's ``alignment``).

Keys: ``<eval name>@<intervention>/<group>/alignment_best`` and ``.../alignment_avg``; files under
``<eval dir>/<tag>@<intervention>/`` with ``best_avg.json``. The questions, judges, decoding length, batch size and
seed are those of the ``Evaluate`` callback.

Training (a mitigation the paper does not test): with ``train_rate > 0`` the same perturbation is applied to the
segment of a share of the rows of every training batch, in ``on_train_batch_start``, by replacing
``batch["input_ids"]`` in place (the batch contract of ``data/chat.py``: values are replaced by key, the dict is never
rebound). The draws depend only on the seed, epoch, batch index and rank, so a resumed run perturbs identically.
Note that a prefix KV regularizer compares against the *clean* prefix.

Stack it on an experiment: ``python main.py test --config configs/treft_legal.yaml --config
callbacks/prefix_perturbation.yaml --ckpt_path <checkpoint>``.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import replace
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from piggy_lightning.callbacks.evaluation import Evaluate
from piggy_lightning.callbacks.patching import EvaluatesAt, PatchMoment
from piggy_lightning.evaluation.runner import EvaluationReport
from piggy_lightning.interventions.perturbation import (
    NearestNeighbours,
    PromptPerturbation,
    Replacer,
    Segment,
    Similarity,
    UniformTokens,
    perturb_tokens,
)


def best_and_average(records: list[dict], metric: str) -> dict[str, dict[str, float]]:
    """Per group: ``best`` (mean over prompts of the max over trials) and ``avg`` (mean over scored trials).

    Args:
        records: Result records with ``judgements``; a prompt is a (group, question id, paraphrase index).
        metric: The judgement to read; unscored trials (refusal, code, unparsed) are dropped, as in the paper.
    """
    trials: dict[str, dict[tuple[str, int], list[float]]] = {}
    for r in records:
        score = r.get("judgements", {}).get(metric, {}).get("score")
        if score is not None:
            trials.setdefault(r["group"], {}).setdefault((r["question_id"], r["paraphrase_index"]), []).append(score)
    out = {}
    for group, prompts in sorted(trials.items()):
        scores = [s for ss in prompts.values() for s in ss]
        out[group] = {"best": sum(max(ss) for ss in prompts.values()) / len(prompts), "avg": sum(scores) / len(scores)}
    return out


class TokenPerturbation(EvaluatesAt):
    """Perturbs one prompt segment with near-embedding (or random) tokens: evaluated as Best/Avg, or while training.

    Args:
        segment: The span perturbed: ``prefix`` (the paper's main finding), ``query`` or ``postfix``.
        n_tokens: Tokens replaced per prompt (paper: 10); all of the segment's when it is shorter.
        replacement: ``neighbours``: one of the ``k`` nearest tokens in the input-embedding matrix, the token itself
            excluded; ``uniform``: a uniformly random other vocabulary token (the paper's Fig. 11 control).
        k: Nearest neighbours to choose from (paper: 5).
        similarity: ``cosine`` (the released code) or ``dot`` (the paper's text).
        trials: Perturbed versions of each prompt (paper: 10), one response each.
        temperature: Sampling temperature of the trials (the release: 0.7; 0 decodes greedily).
        top_p: Nucleus mass of the trials (the release: 0.9).
        at: Moments to evaluate: ``fit_end`` and/or ``test``; None means ``[test]``; ``[]`` never evaluates.
        train_rate: Share of training rows whose segment is perturbed at each step; 0 leaves training alone.
        seed: Seed of the training perturbations (evaluation draws follow the evaluation's decoding seed).
        metric: Judge metric of Best and Avg.
        prompt_as: ``tokens``: generate from the perturbed token ids (exactly ``n_tokens`` changed); ``text``: decode
            the perturbed prompt and tokenize it again, as the release does (merges and splits can occur).
        evaluate: ``name`` of the ``Evaluate`` callback whose questions, judges and files are used.
        name: Tags records, files and metric keys; None derives ``perturb_<segment>_<replacement>``.
    """

    needs_reference: bool = False  # perturbs prompts of the policy itself; the reference is never read

    def __init__(
        self,
        segment: Segment = "prefix",
        n_tokens: int = 10,
        replacement: Literal["neighbours", "uniform"] = "neighbours",
        k: int = 5,
        similarity: Similarity = "cosine",
        trials: int = 10,
        temperature: float = 0.7,
        top_p: float = 0.9,
        at: list[PatchMoment] | None = None,
        train_rate: float = 0.0,
        seed: int = 0,
        metric: str = "aligned",
        prompt_as: Literal["tokens", "text"] = "tokens",
        evaluate: str = "eval",
        name: str | None = None,
    ) -> None:
        if n_tokens < 1 or trials < 1 or k < 1:
            raise ValueError(f"n_tokens, trials and k must be positive, got {n_tokens}, {trials}, {k}")
        if not 0.0 <= train_rate <= 1.0:
            raise ValueError(f"train_rate must be in [0, 1], got {train_rate}")
        self.segment, self.n_tokens, self.replacement = segment, n_tokens, replacement
        self.k, self.similarity, self.trials = k, similarity, trials
        self.temperature, self.top_p = temperature, top_p
        super().__init__(at, evaluate, name or f"perturb_{segment}_{replacement}")
        if prompt_as not in ("tokens", "text"):
            raise ValueError(f"prompt_as must be 'tokens' or 'text', got {prompt_as!r}")
        self.train_rate, self.seed, self.metric, self.prompt_as = train_rate, seed, metric, prompt_as
        self.last_scores: dict[str, dict[str, float]] = {}
        self._trials_evaluate: Evaluate | None = None
        self._train_replacer: Replacer | None = None

    def replacer(self, pl_module: L.LightningModule) -> Replacer:
        """The replacement rule over the policy's current input embeddings and its tokenizer's vocabulary."""
        embeddings = pl_module.policy.get_input_embeddings().weight
        vocab = min(len(pl_module.tokenizer), embeddings.size(0))
        if self.replacement == "uniform":
            return UniformTokens(vocab)
        return NearestNeighbours(embeddings, self.k, self.similarity, vocab)

    # -- training --------------------------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict[str, Tensor], batch_idx: int
    ) -> None:
        if self.train_rate == 0:
            return
        key = f"{self.segment}_mask"
        if key not in batch:
            raise KeyError(f"{type(self).__name__} needs batches with {key!r} (the ChatSFTDataModule batch contract)")
        if self._train_replacer is None or pl_module.policy.get_input_embeddings().weight.requires_grad:
            self._train_replacer = self.replacer(pl_module)  # trained embeddings move: recompute neighbours
        parts = (self.seed, trainer.current_epoch, batch_idx, trainer.global_rank)
        generator = torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))
        mask = batch[key].bool() & batch["attention_mask"].bool()  # (B, T)
        rows = torch.rand(mask.size(0), generator=generator) < self.train_rate  # (B,)
        mask &= rows.to(mask.device)[:, None]
        batch["input_ids"] = perturb_tokens(batch["input_ids"], mask, self.n_tokens, self._train_replacer, generator)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.train_rate > 0 and self.segment == "prefix":
            from piggy_lightning.regularizers import PrefixKVDrift

            for reg in getattr(pl_module, "regularizers", []):
                if isinstance(reg, PrefixKVDrift) and reg.mismatch == "error":
                    raise ValueError(
                        f"{type(self).__name__} perturbs training prefixes, but regularizer {reg.name!r} compares "
                        "every row with the one cached default prefix; set its mismatch: per_row (reference forward "
                        "on the perturbed rows) or drop one of the two"
                    )

    # -- evaluation ------------------------------------------------------------------------------------------
    def _trials(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Evaluate:
        """An ``Evaluate`` like the configured one, with ``trials`` samples per prompt and this callback's sampling."""
        if self._trials_evaluate is None:
            base = self._evaluate
            decoding = replace(base.decoding, samples=self.trials, temperature=self.temperature, top_p=self.top_p)
            self._trials_evaluate = Evaluate(
                base.question_sets, base.judges, decoding, at=[], output_dir=str(base.out_dir(trainer)),
                judge_cache=str(base.evaluation.judge_cache), name=base.name, samples_logged=base.samples_logged,
                misaligned_below=base.thresholds[0], coherent_above=base.thresholds[1],
            )  # fmt: skip
            self._trials_evaluate.setup(trainer, pl_module, "test")
        return self._trials_evaluate

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> EvaluationReport | None:
        """Evaluate the perturbed prompts now; returns the report (None off rank 0) and logs Best and Avg."""
        roundtrip = pl_module.tokenizer if self.prompt_as == "text" else None
        intervention = PromptPerturbation(self.segment, self.n_tokens, self.replacer(pl_module), self.name, roundtrip)
        report = self._trials(trainer, pl_module).evaluate(trainer, pl_module, tag, intervention)
        if report is None:
            return None
        self.last_scores = best_and_average(report.records, self.metric)
        label = {"aligned": "alignment", "coherent": "coherence"}.get(self.metric, self.metric)
        scalars = {
            f"{self._evaluate.name}@{self.name}/{group}/{label}_{kind}": value
            for group, scores in self.last_scores.items()
            for kind, value in scores.items()
        }
        if trainer.testing:
            pl_module.log_dict(scalars, rank_zero_only=True)
        else:
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=trainer.global_step)
        self._write(report, self.last_scores)
        return report

    @rank_zero_only
    def _write(self, report: EvaluationReport, scores: dict[str, dict[str, float]]) -> None:
        keys = ("segment", "n_tokens", "replacement", "k", "similarity", "trials", "prompt_as")
        settings = {k: getattr(self, k) for k in keys}
        (report.out_dir / "best_avg.json").write_text(json.dumps({**settings, "groups": scores}, indent=2) + "\n")
