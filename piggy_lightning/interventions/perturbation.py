"""Token perturbation (paper §2, Table 1): evaluate with a few tokens of one prompt segment replaced.

:class:`Perturb` is a component of ``Evaluate(interventions=[...])`` and the generation intervention it evaluates
under: every question is asked ``trials`` times, each time with ``n_tokens`` tokens of the chosen segment (prefix,
query or postfix) replaced by its ``replacer``
(:class:`~piggy_lightning.interventions.replacers.NearestNeighbours` by default, paper: n = 10, k = 5; or
:class:`~piggy_lightning.interventions.replacers.UniformTokens`), sampled as configured (the release samples at
temperature 0.7, top-p 0.9). Reported per group, next to the evaluation's usual metrics:

* **Best**: for each prompt (question and paraphrase) the maximum score over its trials, averaged over prompts;
* **Avg.**: the mean score over all trials and prompts (equal to the group's ``alignment``).

Keys: ``<eval name>@<name>/<group>/alignment_best`` and ``.../alignment_avg``; files under
``<eval dir>/<tag>@<name>/`` with ``best_avg.json``. Perturbed prompts stay token sequences: nothing is decoded and
re-tokenized. :class:`PerturbAsText` decodes the perturbed prompt to text and tokenizes it again, as the release
does before handing prompts to vLLM; that round trip can merge or split tokens at the edits, so the number of
changed tokens is then only approximately ``n``. Each (prompt, sample) draws anew from a seed of its own.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

import torch

from piggy_lightning.evaluation.generation import Decoding
from piggy_lightning.evaluation.intervention import GenerationIntervention
from piggy_lightning.evaluation.runner import EvaluationReport
from piggy_lightning.interventions.base import Findings, Intervention, Occasion, PatchMoment, Run, require
from piggy_lightning.interventions.replacers import NearestNeighbours, Replacer, perturb_tokens
from piggy_lightning.spans import TokenizedChat

if TYPE_CHECKING:
    from piggy_lightning.module import PiggyModule

Segment = Literal["prefix", "query", "postfix"]


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


class Perturb(Intervention, GenerationIntervention):
    """Perturbs one segment of every evaluation prompt with replacer tokens, over sampled trials: Best and Avg.

    Args:
        segment: The span perturbed: ``prefix`` (the paper's main finding), ``query`` or ``postfix``.
        n_tokens: Tokens replaced per prompt (paper: 10); all of the segment's when it is shorter.
        replacer: What a replaced token becomes; None means ``NearestNeighbours(k=5, similarity=cosine)``.
        trials: Perturbed versions of each prompt (paper: 10), one response each.
        temperature: Sampling temperature of the trials (the release: 0.7; 0 decodes greedily).
        top_p: Nucleus mass of the trials (the release: 0.9).
        metric: Judge metric of Best and Avg.
        at: Moments to evaluate under it: ``epoch`` (each evaluated epoch end), ``fit_end``, ``test``; None: ``[test]``.
        name: Tags records, files and metric keys; None derives ``perturb_<segment>_<replacer label>``.
    """

    prompt_as = "tokens"

    def __init__(
        self,
        segment: Segment = "prefix",
        n_tokens: int = 10,
        replacer: Replacer | None = None,
        trials: int = 10,
        temperature: float = 0.7,
        top_p: float = 0.9,
        metric: str = "aligned",
        at: list[PatchMoment] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(at)
        if n_tokens < 1 or trials < 1:
            raise ValueError(f"n_tokens and trials must be positive, got {n_tokens}, {trials}")
        self.segment, self.n_tokens, self.trials = segment, n_tokens, trials
        self.replacer = replacer if replacer is not None else NearestNeighbours()
        self.temperature, self.top_p, self.metric = temperature, top_p, metric
        self.name = name or self._default_name()
        self.roundtrip: Any | None = None  # a tokenizer: decode and re-tokenize (PerturbAsText)
        self.last_scores: dict[str, dict[str, float]] = {}

    def _default_name(self) -> str:
        return f"perturb_{self.segment}_{self.replacer.label}"

    def bind(self, module: PiggyModule) -> Perturb:
        """Fit the replacer to the policy's current input embeddings and its tokenizer's vocabulary."""
        require(module, ("policy", "tokenizer"), type(self).__name__)
        embeddings = module.policy.get_input_embeddings().weight
        self.replacer.fit(embeddings, min(len(module.tokenizer), embeddings.size(0)))
        return self

    def runs(self, module: PiggyModule) -> list[GenerationIntervention]:
        return [self.bind(module)]

    def decoding(self, decoding: Decoding) -> Decoding:
        return replace(decoding, samples=self.trials, temperature=self.temperature, top_p=self.top_p)

    def touched(self, prompt: TokenizedChat) -> int:
        """Tokens replaced in ``prompt``: ``n_tokens``, or the whole segment when it is shorter."""
        return min(self.n_tokens, sum(prompt.mask(self.segment)))

    def transform(self, prompt: TokenizedChat, seed: int) -> TokenizedChat:
        ids = torch.tensor([prompt.input_ids])  # (1, T)
        mask = torch.tensor([prompt.mask(self.segment)])  # (1, T)
        if not bool(mask.any()):  # perturbing nothing would report the unperturbed answer as perturbed
            raise ValueError(f"{self.name}: the prompt has no {self.segment} tokens to perturb")
        new = perturb_tokens(ids, mask, self.n_tokens, self.replacer, torch.Generator().manual_seed(seed))
        if self.roundtrip is None:
            return TokenizedChat(new[0].tolist(), list(prompt.spans))
        text = self.roundtrip.decode(new[0].tolist(), skip_special_tokens=False)
        return relabel(prompt, self.roundtrip(text, add_special_tokens=False)["input_ids"], self.segment)

    def conclude(self, runs: list[Run], baseline: EvaluationReport | None, occasion: Occasion) -> Findings:
        """Best and Avg per group, logged and written to ``best_avg.json`` beside the trials' results."""
        label = {"aligned": "alignment", "coherent": "coherence"}.get(self.metric, self.metric)
        findings = Findings()
        for intervention, report in runs:
            self.last_scores = best_and_average(report.records, self.metric)
            for group, scores in self.last_scores.items():
                for kind, value in scores.items():
                    findings.scalars[f"{occasion.name}@{intervention.name}/{group}/{label}_{kind}"] = value
            settings = {"segment": self.segment, "n_tokens": self.n_tokens, "replacement": self.replacer.label,
                        **self.replacer.describe(), "trials": self.trials, "temperature": self.temperature,
                        "top_p": self.top_p, "prompt_as": self.prompt_as}  # fmt: skip
            path = report.out_dir / "best_avg.json"
            path.write_text(json.dumps({**settings, "groups": self.last_scores}, indent=2) + "\n")
        return findings


class PerturbAsText(Perturb):
    """:class:`Perturb`, then the perturbed prompt is decoded and tokenized again, as the release does (merges and
    splits can occur at the edits, so about ``n_tokens`` tokens change). Arguments as in :class:`Perturb`; the
    default name is ``perturb_text_<segment>_<replacer label>``."""

    prompt_as = "text"

    def _default_name(self) -> str:
        return f"perturb_text_{self.segment}_{self.replacer.label}"

    def bind(self, module: PiggyModule) -> PerturbAsText:
        super().bind(module)
        self.roundtrip = module.tokenizer
        return self


def relabel(original: TokenizedChat, ids: list[int], segment: Segment) -> TokenizedChat:
    """Span labels for a re-tokenized prompt: tokens shared with ``original`` at the start and at the end keep their
    labels, the changed stretch between them is labelled ``segment``."""
    n = min(len(ids), len(original.input_ids))
    head = next((i for i in range(n) if ids[i] != original.input_ids[i]), n)
    tail = next((i for i in range(n - head) if ids[-1 - i] != original.input_ids[-1 - i]), n - head)
    middle = len(ids) - head - tail
    spans = original.spans[:head] + [segment] * middle + (original.spans[len(original.spans) - tail :] if tail else [])
    return TokenizedChat(list(ids), spans)
