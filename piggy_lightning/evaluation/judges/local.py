"""A judge run on a local causal LM, scored the logprob way (Betley et al.): the judge prompt is rendered with the
model's chat template, one forward gives the next-token distribution, and its top-k tokens that are integers in
range give the probability-weighted score (see :func:`~piggy_lightning.evaluation.judges.scoring.score_from_logprobs`).

That single token can express a 0-100 score only if the tokenizer has whole-number tokens: a judge whose tokenizer
splits "85" into "8", "5" (Qwen, SmolLM2, ...) is refused for such metrics with a
:class:`~piggy_lightning.evaluation.judges.base.JudgeConfigError` before any forward (detectors scored 0/1 still
work). The model loads on first use, never in the constructor.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from piggy_lightning.evaluation.judges.base import Judge, Judgement, JudgeRequest
from piggy_lightning.evaluation.judges.digits import check_whole_number_tokens
from piggy_lightning.evaluation.judges.prompts import SCALES, check_single_token, render, template_for
from piggy_lightning.evaluation.judges.scoring import score_from_logprobs
from piggy_lightning.forward import eval_mode
from piggy_lightning.modeling import DType


class LocalJudge(Judge):
    """Logprob-mode judge on any local causal LM with a chat template.

    Args:
        model_name_or_path: A transformers model id or directory.
        dtype: Weight dtype at load time.
        device: Where to run it (e.g. ``cuda:0``); None picks CUDA when available.
        batch_size: Judge prompts per forward.
        top_logprobs: How many of the likeliest next tokens are considered (Betley et al.: 20).
        min_numeric_mass: Least probability on integer tokens for an answer to be scored.
        chat_template_kwargs: Extra ``apply_chat_template`` arguments (e.g. ``{"enable_thinking": false}``).
    """

    def __init__(
        self,
        model_name_or_path: str,
        dtype: DType = "auto",
        device: str | None = None,
        batch_size: int = 8,
        top_logprobs: int = 20,
        min_numeric_mass: float = 0.25,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.model_name_or_path = model_name_or_path
        self.dtype = dtype
        self.device = device
        self.batch_size = batch_size
        self.top_logprobs = top_logprobs
        self.min_numeric_mass = min_numeric_mass
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.model: nn.Module | None = None
        self.tokenizer = None
        self._checked: set[int] = set()  # score scales whose numbers are known to be single tokens

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer, name: str, **kwargs: Any) -> LocalJudge:
        """A judge around an already loaded model (``name`` stands for it in the cache identity)."""
        judge = cls(name, **kwargs)
        judge.model, judge.tokenizer = model, tokenizer
        return judge

    @property
    def identity(self) -> str:
        return f"local|{self.model_name_or_path}|top{self.top_logprobs}|mass{self.min_numeric_mass}"

    def _load(self) -> None:
        if self.model is not None:
            return
        from piggy_lightning.modeling import load_causal_lm, load_tokenizer

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(self.model_name_or_path)
        self.model = load_causal_lm(self.model_name_or_path, self.dtype).to(device).eval()

    def _prompt_ids(self, text: str) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}],
                tokenize=False,
                add_generation_prompt=True,
                **self.chat_template_kwargs,
            )
            return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(text)["input_ids"])

    @torch.no_grad()
    def _top_tokens(self, prompts: list[list[int]]) -> list[list[tuple[str, float]]]:
        """Top-k ``(token text, logprob)`` of the next token after each prompt (left padded, true positions)."""
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)  # (B, T)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): padding does not shift positions
        with eval_mode(self.model):
            logits = self.model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                use_cache=False,
            ).logits[:, -1]  # (B, V)
        top = torch.log_softmax(logits.float(), dim=-1).topk(self.top_logprobs, dim=-1)
        return [
            [(self.tokenizer.decode([t]), lp) for t, lp in zip(row_ids, row_lps, strict=True)]
            for row_ids, row_lps in zip(top.indices.tolist(), top.values.tolist(), strict=True)
        ]

    def _check_scale(self, max_score: float) -> None:
        scale = int(max_score)
        if scale not in self._checked:
            check_whole_number_tokens(self.tokenizer, scale, repr(self.model_name_or_path))
            self._checked.add(scale)

    def iter_judgements(self, requests: Sequence[JudgeRequest]) -> Iterator[list[tuple[int, Judgement]]]:
        """Yield the judgements of each batch as it is scored.

        Raises:
            JudgeConfigError: A metric's scale has numbers the tokenizer splits into several tokens, or its built-in
                prompt asks for an explanation before the score (``helpful``).
        """
        if not requests:
            return
        for r in requests:
            check_single_token(r.metric, r.prompt_template, f"LocalJudge {self.model_name_or_path!r}")
        self._load()
        for scale in {SCALES.get(r.metric, 100.0) for r in requests}:
            self._check_scale(scale)
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            prompts = [
                self._prompt_ids(render(template_for(r.metric, r.prompt_template), r.question, r.answer)) for r in chunk
            ]
            tops = self._top_tokens(prompts)
            yield [
                (start + k, score_from_logprobs(top, SCALES.get(r.metric, 100.0), self.min_numeric_mass))
                for k, (r, top) in enumerate(zip(chunk, tops, strict=True))
            ]

    def judge(self, requests: Sequence[JudgeRequest]) -> list[Judgement]:
        return [verdict for group in self.iter_judgements(requests) for _, verdict in group]
