"""Token perturbation (paper §2, Table 1): replace a few tokens of one prompt segment by embedding neighbours.

In the chosen segment (prefix, query or postfix), ``n`` positions are drawn without replacement (all of them
when the segment is shorter) and each token is replaced by one drawn uniformly from its ``k`` nearest neighbours
in the input-embedding matrix, the token itself excluded (:class:`NearestNeighbours`; paper: n = 10, k = 5), or,
for the control, by a uniformly random other vocabulary token (:class:`UniformTokens`). Special tokens can be
replaced, as in the paper. Similarity is the dot product (the paper's text) or the cosine (the released code,
which L2-normalizes the embeddings); both are offered.

By default perturbed prompts stay token sequences: nothing is decoded and re-tokenized. With a ``roundtrip``
tokenizer the perturbed prompt is decoded to text and tokenized again, as the release does before handing prompts
to vLLM; that round trip can merge or split tokens at the edits, so the number of changed tokens is then only
approximately ``n``. Every draw comes from a ``torch.Generator`` seeded by the caller, so a prompt's perturbation
is reproducible from its seed.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from piggy_lightning.evaluation.intervention import GenerationIntervention
from piggy_lightning.spans import TokenizedChat

Segment = Literal["prefix", "query", "postfix"]
Similarity = Literal["cosine", "dot"]


class NearestNeighbours:
    """Replaces a token by one of its ``k`` nearest other tokens in an embedding matrix.

    Neighbours are computed on demand for the tokens asked about, in float32 over vocabulary chunks (no float copy
    of a large bf16 matrix), and cached: the matrix is read as it is when first asked, so build a new object after
    the embeddings change.

    Args:
        embeddings: ``(V', D)`` input-embedding matrix.
        k: Neighbours to choose from.
        similarity: ``cosine`` (the released code) or ``dot`` (the paper's text).
        vocab_size: Only tokens below this id are candidates (embedding rows past the tokenizer's vocabulary are
            padding); None means every row.
    """

    _CHUNK = 32768  # vocabulary rows per float32 block

    def __init__(
        self, embeddings: Tensor, k: int = 5, similarity: Similarity = "cosine", vocab_size: int | None = None
    ):
        self.vocab_size = min(vocab_size or embeddings.size(0), embeddings.size(0))
        if not 1 <= k < self.vocab_size:
            raise ValueError(f"k must be in [1, {self.vocab_size}), got {k}")
        self.embeddings = embeddings.detach()
        self.k = k
        self.similarity = similarity
        self._cache: dict[int, Tensor] = {}

    def _scores(self, ids: Tensor) -> Tensor:
        """``(n, V)`` similarity of ``ids`` to every candidate token."""
        query = self.embeddings[ids].float()  # (n, D)
        blocks = []
        for start in range(0, self.vocab_size, self._CHUNK):
            block = self.embeddings[start : min(start + self._CHUNK, self.vocab_size)].float()  # (c, D)
            if self.similarity == "cosine":
                block = torch.nn.functional.normalize(block, dim=-1)
            blocks.append(query @ block.T)  # (n, c)
        scores = torch.cat(blocks, dim=1)
        return scores / query.norm(dim=-1, keepdim=True).clamp_min(1e-12) if self.similarity == "cosine" else scores

    @torch.no_grad()
    def table(self, tokens: Tensor) -> Tensor:
        """``(N, k)`` nearest-neighbour ids of ``tokens`` ``(N,)``, most similar first, never the token itself."""
        missing = sorted({t for t in tokens.tolist() if t not in self._cache})
        if missing:
            ids = torch.tensor(missing, device=self.embeddings.device)
            scores = self._scores(ids)  # (n, V)
            rows = torch.arange(len(missing), device=ids.device)
            inside = ids < self.vocab_size  # a token past the candidates cannot pick itself anyway
            scores[rows[inside], ids[inside]] = float("-inf")
            for token, row in zip(missing, scores.topk(self.k, dim=-1).indices.cpu(), strict=True):
                self._cache[token] = row
        if not len(tokens):
            return torch.zeros(0, self.k, dtype=torch.long)
        return torch.stack([self._cache[t] for t in tokens.tolist()])

    def __call__(self, tokens: Tensor, generator: torch.Generator) -> Tensor:
        """One random neighbour per token: ``(N,)`` -> ``(N,)`` on the tokens' device."""
        choice = torch.randint(self.k, (len(tokens),), generator=generator)  # (N,)
        return self.table(tokens)[torch.arange(len(tokens)), choice].to(tokens.device)


class UniformTokens:
    """Replaces a token by a uniformly random other token of the vocabulary (the paper's Fig. 11 control).

    Args:
        vocab_size: Tokens are drawn from ``[0, vocab_size)``.
    """

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        self.vocab_size = vocab_size

    def __call__(self, tokens: Tensor, generator: torch.Generator) -> Tensor:
        draw = torch.randint(self.vocab_size - 1, (len(tokens),), generator=generator).to(tokens.device)
        return draw + (draw >= tokens).long()  # skip the token itself, keeping the rest uniform


Replacer = NearestNeighbours | UniformTokens


def perturb_tokens(input_ids: Tensor, mask: Tensor, n: int, replace: Replacer, generator: torch.Generator) -> Tensor:
    """Return a copy of ``input_ids`` with ``n`` randomly chosen ``mask`` positions per row replaced.

    Args:
        input_ids: ``(B, T)`` token ids.
        mask: ``(B, T)`` positions that may change (one segment); rows with fewer than ``n`` change all of them.
        n: Positions to replace per row.
        replace: Maps ``(N,)`` tokens to ``(N,)`` replacements.
        generator: The source of every random draw (CPU).
    """
    scores = torch.rand(mask.shape, generator=generator).to(mask.device)  # (B, T)
    scores = scores.masked_fill(~mask, -1.0)
    top = scores.topk(min(n, mask.size(1)), dim=1)  # (B, n)
    chosen = torch.zeros_like(mask).scatter(1, top.indices, top.values >= 0) & mask  # (B, T)
    out = input_ids.clone()
    out[chosen] = replace(input_ids[chosen], generator)
    return out


class PromptPerturbation(GenerationIntervention):
    """Perturbs one segment of every evaluation prompt before generation; each (prompt, sample) draws anew.

    Args:
        segment: The span to perturb.
        n_tokens: Tokens replaced per prompt.
        replace: :class:`NearestNeighbours` or :class:`UniformTokens`.
        name: Tags the result records.
        roundtrip: A tokenizer: decode the perturbed prompt and tokenize it again (the release's text round trip);
            None generates from the perturbed token ids as they are.
    """

    def __init__(
        self, segment: Segment, n_tokens: int, replace: Replacer, name: str, roundtrip: Any | None = None
    ) -> None:
        self.segment = segment
        self.n_tokens = n_tokens
        self.replace = replace
        self.name = name
        self.roundtrip = roundtrip

    def touched(self, prompt: TokenizedChat) -> int:
        """Tokens replaced in ``prompt``: ``n_tokens``, or the whole segment when it is shorter."""
        return min(self.n_tokens, sum(prompt.mask(self.segment)))

    def transform(self, prompt: TokenizedChat, seed: int) -> TokenizedChat:
        ids = torch.tensor([prompt.input_ids])  # (1, T)
        mask = torch.tensor([prompt.mask(self.segment)])  # (1, T)
        if not bool(mask.any()):  # perturbing nothing would report the unperturbed answer as perturbed
            raise ValueError(f"{self.name}: the prompt has no {self.segment} tokens to perturb")
        new = perturb_tokens(ids, mask, self.n_tokens, self.replace, torch.Generator().manual_seed(seed))
        if self.roundtrip is None:
            return TokenizedChat(new[0].tolist(), list(prompt.spans))
        text = self.roundtrip.decode(new[0].tolist(), skip_special_tokens=False)
        return relabel(prompt, self.roundtrip(text, add_special_tokens=False)["input_ids"], self.segment)


def relabel(original: TokenizedChat, ids: list[int], segment: Segment) -> TokenizedChat:
    """Span labels for a re-tokenized prompt: tokens shared with ``original`` at the start and at the end keep their
    labels, the changed stretch between them is labelled ``segment``."""
    n = min(len(ids), len(original.input_ids))
    head = next((i for i in range(n) if ids[i] != original.input_ids[i]), n)
    tail = next((i for i in range(n - head) if ids[-1 - i] != original.input_ids[-1 - i]), n - head)
    middle = len(ids) - head - tail
    spans = original.spans[:head] + [segment] * middle + (original.spans[len(original.spans) - tail :] if tail else [])
    return TokenizedChat(list(ids), spans)
