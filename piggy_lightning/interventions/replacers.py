"""Token replacers (paper §2, Table 1): what a perturbed token becomes, and the draw of the perturbed positions.

A replacer is a component configured by class path (``Perturb(replacer=...)``, ``PerturbedTraining(replacer=...)``)
and fitted to a model before use (:meth:`Replacer.fit`: its input embeddings and its tokenizer's vocabulary size):

* :class:`NearestNeighbours`: one token drawn uniformly from the ``k`` nearest in the input-embedding matrix, the
  token itself excluded (paper: k = 5). Similarity is the dot product (the paper's text) or the cosine (the
  released code, which L2-normalizes the embeddings).
* :class:`UniformTokens`: a uniformly random other vocabulary token (the paper's Fig. 11 control).

:func:`perturb_tokens` draws the positions: ``n`` per row without replacement among a segment's (all of them when
the segment is shorter). Special tokens can be replaced, as in the paper. Every draw comes from a
``torch.Generator`` seeded by the caller, so a perturbation is reproducible from its seed.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Similarity = Literal["cosine", "dot"]


class Replacer:
    """Maps ``(N,)`` tokens to ``(N,)`` replacements; :meth:`fit` binds it to a model first."""

    label: str = "replaced"  # names perturbations: perturb_<segment>_<label>

    def fit(self, embeddings: Tensor, vocab_size: int | None = None) -> Replacer:
        """Bind to a model's ``(V', D)`` input embeddings, with candidates below ``vocab_size`` (None: every row)."""
        return self

    def __call__(self, tokens: Tensor, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, object]:
        """The settings that shape the replacements, for the files that report them."""
        return {"replacer": type(self).__name__}


class NearestNeighbours(Replacer):
    """Replaces a token by one of its ``k`` nearest other tokens in the input-embedding matrix.

    Neighbours are computed on demand for the tokens asked about, in float32 over vocabulary chunks (no float copy
    of a large bf16 matrix), and cached until the next :meth:`fit` (the matrix is read as it is then).

    Args:
        k: Neighbours to choose from (paper: 5).
        similarity: ``cosine`` (the released code) or ``dot`` (the paper's text).
    """

    label = "neighbours"
    _CHUNK = 32768  # vocabulary rows per float32 block

    def __init__(self, k: int = 5, similarity: Similarity = "cosine") -> None:
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        self.k = k
        self.similarity = similarity
        self.embeddings: Tensor | None = None
        self.vocab_size = 0
        self._cache: dict[int, Tensor] = {}

    def fit(self, embeddings: Tensor, vocab_size: int | None = None) -> NearestNeighbours:
        """Candidates are the rows below ``vocab_size`` (rows past the tokenizer's vocabulary are padding)."""
        self.vocab_size = min(vocab_size or embeddings.size(0), embeddings.size(0))
        if not self.k < self.vocab_size:
            raise ValueError(f"k must be in [1, {self.vocab_size}), got {self.k}")
        self.embeddings = embeddings.detach()
        self._cache = {}
        return self

    def describe(self) -> dict[str, object]:
        return {"replacer": type(self).__name__, "k": self.k, "similarity": self.similarity}

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
        if self.embeddings is None:
            raise RuntimeError("NearestNeighbours is not fitted: call fit(embeddings, vocab_size) first")
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


class UniformTokens(Replacer):
    """Replaces a token by a uniformly random other token of the vocabulary (the paper's Fig. 11 control).

    Args:
        vocab_size: Tokens are drawn from ``[0, vocab_size)``; None takes the model's vocabulary at :meth:`fit`.
    """

    label = "uniform"

    def __init__(self, vocab_size: int | None = None) -> None:
        if vocab_size is not None and vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        self._fixed = vocab_size
        self.vocab_size = vocab_size

    def fit(self, embeddings: Tensor, vocab_size: int | None = None) -> UniformTokens:
        if self._fixed is None:
            self.vocab_size = min(vocab_size or embeddings.size(0), embeddings.size(0))
        return self

    def describe(self) -> dict[str, object]:
        return {"replacer": type(self).__name__, "vocab_size": self.vocab_size}

    def __call__(self, tokens: Tensor, generator: torch.Generator) -> Tensor:
        if self.vocab_size is None:
            raise RuntimeError("UniformTokens has no vocabulary size: pass vocab_size or call fit first")
        draw = torch.randint(self.vocab_size - 1, (len(tokens),), generator=generator).to(tokens.device)
        return draw + (draw >= tokens).long()  # skip the token itself, keeping the rest uniform


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
