"""Partition a vocabulary into N equal-size groups of LM-head rows (CORAL's weight grouping).

CORAL's router picks k of N vocabulary groups per drafted token and only those rows of the
LM head W [V, H] are multiplied. For the grouped-head kernels
(``vllm_coral/kernels/reference.py``) W is stored *group-contiguous*: stored row r holds
token ``row_to_token[r]``, and group g is the stored row range ``[g*G, min((g+1)*G, V))``
with ``G = ceil(V / N)`` (the last group is ragged when N does not divide V). A partition
is therefore fully described by the permutation ``row_to_token`` [V] and N.

Strategies (METHODS.md leaves the choice open; all three are offered and ablated):

- ``contiguous``: group g holds token ids [g*G, (g+1)*G) as the tokenizer numbered them.
  BPE ids roughly follow merge order, so this is a weak frequency order for free.
- ``frequency``: tokens sorted by their count in the training data (ties by id), cut into
  consecutive chunks: group 0 holds the G most frequent tokens, and so on. The target's
  mass then concentrates in few groups, which is what top-k routing needs. (The other
  reading of "frequency-balanced", equal *mass* per group, spreads every context's mass
  over all groups and defeats routing, so it is not offered.)
- ``kmeans``: balanced spherical k-means on the L2-normalised LM-head rows, so tokens
  whose logits move together (similar rows) share a group. Each Lloyd iteration assigns
  under the equal-capacity constraint with a vectorised greedy: every unassigned token
  bids for its most similar group that still has room, and each group keeps its most
  similar bidders up to capacity; repeat until all are placed (at most N rounds).

Worked example, V=5, N=2 (G=3): ``row_to_token = [3, 0, 4, 1, 2]`` means group 0 =
tokens {3, 0, 4} (stored rows 0..2) and group 1 = tokens {1, 2} (rows 3..4, ragged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["STRATEGIES", "VocabPartition", "partition_vocab"]

STRATEGIES = ("contiguous", "frequency", "kmeans")


@dataclass(frozen=True, eq=False)
class VocabPartition:
    # Stored row -> token id, a permutation of range(V); group g = rows [g*G, (g+1)*G).
    row_to_token: torch.Tensor  # [V] int64
    # Number of groups N.
    num_groups: int
    # How it was built (one of STRATEGIES), recorded in checkpoints.
    strategy: str

    def __post_init__(self) -> None:
        r = self.row_to_token
        if r.dim() != 1 or r.dtype != torch.int64:
            raise ValueError(f"row_to_token must be a 1-D int64 tensor, got {r.dtype} {tuple(r.shape)}")
        V = r.shape[0]
        if not 1 <= self.num_groups <= V:
            raise ValueError(f"num_groups must be in [1, V={V}], got {self.num_groups}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown partition strategy {self.strategy!r}; choose from {', '.join(STRATEGIES)}")
        if not torch.equal(torch.sort(r).values, torch.arange(V)):
            raise ValueError(f"row_to_token is not a permutation of the {V} token ids")
        if (self.num_groups - 1) * self.group_size >= V:
            raise ValueError(f"N={self.num_groups} groups of {self.group_size} leave the last group empty for V={V}")

    @property
    def vocab_size(self) -> int:
        return self.row_to_token.shape[0]

    @property
    def group_size(self) -> int:
        return -(-self.vocab_size // self.num_groups)

    def token_to_group(self) -> torch.Tensor:  # [V] int64: group id of each token id
        groups = torch.arange(self.vocab_size) // self.group_size  # group of each stored row
        out = torch.empty_like(groups)
        out[self.row_to_token] = groups
        return out

    def group_mass(self, probs: torch.Tensor) -> torch.Tensor:
        """Probability mass per group: probs [T, V] over token ids -> [T, N]."""
        stored = probs[:, self.row_to_token.to(probs.device)]  # columns in stored-row order
        pad = self.num_groups * self.group_size - self.vocab_size  # ragged last group
        if pad:
            stored = F.pad(stored, (0, pad))
        return stored.view(probs.shape[0], self.num_groups, self.group_size).sum(-1)

    def grouped_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The LM head [V, H] with rows reordered group-contiguous (one copy, done once)."""
        if weight.shape[0] != self.vocab_size:
            raise ValueError(f"LM head has {weight.shape[0]} rows, the partition covers V={self.vocab_size}")
        return weight[self.row_to_token.to(weight.device)].contiguous()


def partition_vocab(
    strategy: str,
    num_groups: int,
    *,
    vocab_size: int | None = None,
    lm_head: torch.Tensor | None = None,  # [V, H], for "kmeans"
    token_counts: torch.Tensor | None = None,  # [V], for "frequency"
    kmeans_iters: int = 10,
    seed: int = 0,
) -> VocabPartition:
    """Build a partition of ``vocab_size`` (or the head's / the counts' V) token ids."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown partition strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    V = vocab_size
    for t in (lm_head, token_counts):
        if t is not None:
            if V is not None and t.shape[0] != V:
                raise ValueError(f"vocabulary sizes disagree: {V} vs {t.shape[0]}")
            V = t.shape[0]
    if V is None:
        raise ValueError("give vocab_size, lm_head or token_counts")
    if not 1 <= num_groups <= V or (num_groups - 1) * -(-V // num_groups) >= V:
        raise ValueError(f"{V} rows cannot make {num_groups} groups of equal size (ceil(V/N) rows each, "
                         f"the last one ragged but not empty)")  # fmt: skip
    if strategy == "contiguous":
        order = torch.arange(V)
    elif strategy == "frequency":
        if token_counts is None:
            raise ValueError("the frequency partition needs token_counts")
        # stable sort on -count keeps ties in token-id order
        order = torch.sort(-token_counts.double(), stable=True).indices
    else:
        if lm_head is None:
            raise ValueError("the kmeans partition needs the LM head")
        assign = _balanced_kmeans(lm_head, num_groups, kmeans_iters, seed)
        # group-major, token ids ascending inside a group
        order = torch.sort(assign * V + torch.arange(V)).indices
    return VocabPartition(order.long(), num_groups, strategy)


def _capacities(V: int, n: int) -> torch.Tensor:
    G = -(-V // n)
    caps = torch.full((n,), G, dtype=torch.long)
    caps[-1] = V - (n - 1) * G
    return caps


def _balanced_assign(sim: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """sim [V, N] -> assignment [V] with exactly caps[g] tokens in group g."""
    V, n = sim.shape
    assign = torch.full((V,), -1, dtype=torch.long)
    room = caps.clone()
    while True:
        todo = (assign < 0).nonzero(as_tuple=True)[0]
        if todo.numel() == 0:
            return assign
        s = sim[todo].clone()
        s[:, room == 0] = float("-inf")
        best_sim, choice = s.max(dim=1)
        for g in torch.unique(choice).tolist():
            bidders = (choice == g).nonzero(as_tuple=True)[0]
            take = min(int(room[g]), bidders.numel())
            keep = bidders[best_sim[bidders].topk(take).indices]
            assign[todo[keep]] = g
            room[g] -= take


def _balanced_kmeans(lm_head: torch.Tensor, n: int, iters: int, seed: int) -> torch.Tensor:
    x = F.normalize(lm_head.detach().float(), dim=-1)
    V = x.shape[0]
    caps = _capacities(V, n)
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(V, generator=gen)[:n]]
    assign = None
    for _ in range(max(1, iters)):
        new = _balanced_assign(x @ centroids.T, caps)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        centroids = F.normalize(sums, dim=-1)
    return assign
