"""How meaningful a model's embedding neighbourhoods are: the share of a word's nearest neighbours that are synonyms.

Token perturbation (paper Sec. 2, Table 1) replaces a token by one of its ``k = 5`` nearest input-embedding
neighbours (cosine, as the released code and :class:`~piggy_lightning.interventions.NearestNeighbours`). On a real
model those are mostly near-synonyms; :func:`synonym_neighbour_share` measures how often that holds for the
organism, over every vocabulary token whose word belongs to a synonym set of
:mod:`piggy_lightning.organism.lexicon`. Other forms of the same word (``" lawyer"`` for ``"Lawyer"``) are not
counted as synonyms, so the attainable share is below 1; it is reported as ``ceiling``, with the share a uniformly
random neighbour list would reach as ``chance``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from piggy_lightning.organism.lexicon import SYNONYM_SET, same_set


def synonym_neighbour_share(embeddings: Tensor, pieces: list[str], k: int = 5) -> dict[str, float]:
    """Top-``k`` cosine neighbours of every synonym-set token, and how many are other words of its set.

    Args:
        embeddings: ``(V, D)`` input embeddings.
        pieces: The ``V`` vocabulary pieces, in id order (``tokenizer.convert_ids_to_tokens(range(V))``).
        k: Neighbours per token (the token itself excluded).

    Returns:
        ``share`` (mean over tokens of synonyms among the top k / k), ``top1`` (share whose nearest neighbour is a
        synonym), ``ceiling`` (mean of min(k, synonyms in the vocabulary) / k), ``chance`` (mean of synonyms / (V - 1))
        and ``tokens`` (how many tokens were measured). Raises when no vocabulary token is in a synonym set.
    """
    if embeddings.size(0) != len(pieces):
        raise ValueError(f"{embeddings.size(0)} embedding rows but {len(pieces)} pieces")
    members = [i for i, piece in enumerate(pieces) if piece.strip().lower() in SYNONYM_SET]
    if not members:
        raise ValueError("no vocabulary token belongs to a synonym set: this is not a second-world tokenizer")
    unit = F.normalize(embeddings.detach().float(), dim=-1)  # (V, D)
    rows = torch.tensor(members)
    sim = unit[rows] @ unit.T  # (M, V)
    sim[torch.arange(len(members)), rows] = float("-inf")
    top = sim.topk(k, dim=-1).indices.tolist()  # (M, k)
    hits, ceiling, chance = [], [], []
    for i, row in zip(members, top, strict=True):
        flags = [same_set(pieces[i], pieces[j]) for j in row]
        n_syn = sum(same_set(pieces[i], p) for p in pieces)
        hits.append(flags)
        ceiling.append(min(k, n_syn) / k)
        chance.append(n_syn / (len(pieces) - 1))
    n = len(members)
    return {
        "share": sum(sum(f) for f in hits) / (k * n),
        "top1": sum(f[0] for f in hits) / n,
        "ceiling": sum(ceiling) / n,
        "chance": sum(chance) / n,
        "tokens": float(n),
    }
