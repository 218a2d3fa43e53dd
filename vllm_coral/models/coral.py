"""CORAL drafter: an EAGLE-style drafter plus an LM-head router over vocabulary groups.

The drafter body is ``EagleDrafter`` unchanged (CORAL's other half, CSRA, is a training
loss: ``vllm_coral.training.losses.csra_loss``). What CORAL adds at inference is the
router: the LM head dominates a one-layer drafter's cost at large vocabularies, so only
k of N vocabulary groups (``vllm_coral.models.vocab_groups``) are computed per token::

    r       = W2 (silu(W1 h) + h) + b2        # [T, N] router logits (W1 [H, H], W2 [N, H])
    groups  = topk(r, k)                       # [T, k]
    logits  = W_grouped[rows of groups] . h    # k*G of the V rows; -inf elsewhere

The router's form is METHODS.md's ``softmax(W2(act(W1 h) + h))``; its softmax only
matters for training, since selection takes the top-k logits. Sampling from the routed
logits is exact speculative decoding: the drafter's proposal q is the softmax over the
selected rows (zero elsewhere), and that is what vLLM's rejection sampler receives.

Checkpoint = the EAGLE tensors + ``router.*`` + ``vocab_groups.row_to_token`` [V] int64
(``coral_tensor_specs`` is the one weight-name map). The group-contiguous head itself is
*not* stored: it is the target's LM head permuted once at load time, so a checkpoint stays
drafter-sized (the head alone would be 113 MB for SmolLM2 in fp32).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vllm_coral.models.checkpoint import CheckpointError
from vllm_coral.models.eagle import EagleConfig, EagleDrafter, eagle_tensor_specs
from vllm_coral.models.registry import DrafterFamily, ServeSpec
from vllm_coral.models.vocab_groups import STRATEGIES, VocabPartition

__all__ = [
    "ARCHITECTURE",
    "FAMILY",
    "CoralConfig",
    "CoralDrafter",
    "Router",
    "check_routing",
    "check_row_to_token",
    "coral_tensor_specs",
    "routed_logits",
    "routed_top_tokens",
    "select_groups",
]

ARCHITECTURE = "EagleCoralLlamaForCausalLM"
ROW_TO_TOKEN = "vocab_groups.row_to_token"


@dataclass(frozen=True)
class CoralConfig:
    TARGET_FIELDS: ClassVar[tuple[str, ...]] = EagleConfig.TARGET_FIELDS
    # The drafter body (hidden size, heads, vocabulary, ...).
    eagle: EagleConfig
    # Number of vocabulary groups N.
    num_groups: int
    # Groups computed per drafted token (k); the rest of the vocabulary gets -inf.
    top_k: int
    # How the vocabulary was partitioned (vllm_coral.models.vocab_groups.STRATEGIES).
    partition: str

    def __post_init__(self) -> None:
        check_routing(self.num_groups, self.top_k, self.partition, self.eagle.vocab_size, "vocab_size")

    @property
    def group_size(self) -> int:
        return -(-self.eagle.vocab_size // self.num_groups)

    @property
    def torch_dtype(self) -> str:
        return self.eagle.torch_dtype

    def to_checkpoint(self) -> tuple[dict, dict]:
        """(the body's Llama fields, {num_groups, top_k, partition})."""
        hf, _ = self.eagle.to_checkpoint()
        return hf, {"num_groups": self.num_groups, "top_k": self.top_k, "partition": self.partition}

    @classmethod
    def from_checkpoint(cls, hf: Mapping, fields: Mapping) -> CoralConfig:
        unknown = sorted(set(fields) - {"num_groups", "top_k", "partition"})
        if unknown:
            raise ValueError(f"unknown CORAL field(s) {', '.join(unknown)}")
        return cls(eagle=EagleConfig.from_checkpoint(hf, {}), **fields)

    @classmethod
    def from_target(cls, target_config: Mapping, **overrides) -> CoralConfig:
        groups = {k: overrides.pop(k) for k in ("num_groups", "top_k", "partition") if k in overrides}
        return cls(eagle=EagleConfig.from_target(dict(target_config), **overrides),
                   **{"num_groups": 16, "top_k": 2, "partition": "frequency", **groups})  # fmt: skip

    def tensor_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return coral_tensor_specs(self)


def check_routing(num_groups: int, top_k: int, partition: str, rows: int, what: str) -> None:
    """ValueError unless N groups of ``rows`` head rows, k of them routed, by a known partition."""
    if not 1 <= num_groups <= rows:
        raise ValueError(f"num_groups must be in [1, {what}={rows}], got {num_groups}")
    if not 1 <= top_k <= num_groups:
        raise ValueError(f"top_k must be in [1, num_groups={num_groups}], got {top_k}")
    if partition not in STRATEGIES:
        raise ValueError(f"unknown partition {partition!r}; choose from {', '.join(STRATEGIES)}")


def coral_tensor_specs(c: CoralConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The one weight-name map: EAGLE tensors + router + the partition's row map."""
    H, dtype = c.eagle.hidden_size, c.eagle.dtype
    return {
        **eagle_tensor_specs(c.eagle),
        "router.w1.weight": ((H, H), dtype),
        "router.w2.weight": ((c.num_groups, H), dtype),
        "router.w2.bias": ((c.num_groups,), dtype),
        ROW_TO_TOKEN: ((c.eagle.vocab_size,), torch.int64),
    }


class Router(nn.Module):
    """h [T, H] -> group logits [T, N]: W2 (silu(W1 h) + h) + b2."""

    def __init__(self, hidden_size: int, num_groups: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden_size, hidden_size, bias=False)
        self.w2 = nn.Linear(hidden_size, num_groups, bias=True)
        nn.init.zeros_(self.w2.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(h)) + h)


def select_groups(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:  # [T, N] -> [T, k] int64
    return router_logits.topk(top_k, dim=-1).indices


def routed_logits(
    hidden: torch.Tensor,  # [T, H]
    grouped_weight: torch.Tensor,  # [V, H] group-contiguous (VocabPartition.grouped_weight)
    group_ids: torch.Tensor,  # [T, k] distinct per row
    group_size: int,
    row_to_token: torch.Tensor,  # [V] int64
) -> torch.Tensor:  # [T, V] fp32: the selected rows' logits at their token ids, -inf elsewhere
    """Full-vocabulary logits with only the selected groups computed (what sampling needs)."""
    from vllm_coral.kernels.dispatch import grouped_lm_head

    V = grouped_weight.shape[0]
    part, token_ids = grouped_lm_head(hidden, grouped_weight, group_ids, group_size, row_to_token,
                                      validate=False)  # fmt: skip
    # Ragged-group padding slots carry token id -1: send them to a spare column V, dropped after.
    full = part.new_full((hidden.shape[0], V + 1), float("-inf"))
    full.scatter_(1, torch.where(token_ids < 0, V, token_ids), part)
    return full[:, :V]


def routed_top_tokens(
    hidden: torch.Tensor,  # [T, H]
    grouped_weight: torch.Tensor,  # [V, H]
    group_ids: torch.Tensor,  # [T, k]
    group_size: int,
    row_to_token: torch.Tensor,  # [V]
) -> torch.Tensor:  # [T] int64 greedy draft tokens
    from vllm_coral.kernels.dispatch import grouped_lm_head_argmax

    return grouped_lm_head_argmax(hidden, grouped_weight, group_ids, group_size, row_to_token,
                                  validate=False)[1]  # fmt: skip


class CoralDrafter(nn.Module):
    """EagleDrafter + Router + VocabPartition; the training-side twin of the vLLM class."""

    def __init__(self, config: CoralConfig, partition: VocabPartition | None = None,
                 body: EagleDrafter | None = None) -> None:  # fmt: skip
        super().__init__()
        if partition is None:  # identity until a checkpoint's group map is loaded
            partition = VocabPartition(torch.arange(config.eagle.vocab_size), config.num_groups, config.partition)
        if partition.num_groups != config.num_groups or partition.vocab_size != config.eagle.vocab_size:
            raise ValueError(
                f"partition ({partition.num_groups} groups over V={partition.vocab_size}) does not match the "
                f"config ({config.num_groups} groups over V={config.eagle.vocab_size})"
            )
        self.config = config
        self.partition = partition
        self.body = body if body is not None else EagleDrafter(config.eagle)
        self.router = Router(config.eagle.hidden_size, config.num_groups)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        tensors = dict(self.body.state_dict())
        tensors.update({f"router.{k}": v for k, v in self.router.state_dict().items()})
        tensors[ROW_TO_TOKEN] = self.partition.row_to_token
        return tensors

    def load_checkpoint_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        self.partition = check_row_to_token(tensors.pop(ROW_TO_TOKEN), self.config, "CORAL checkpoint")
        self.body.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("router.")})
        self.router.load_state_dict({k[len("router."):]: v for k, v in tensors.items() if k.startswith("router.")})

    @classmethod
    def from_eagle(cls, body: EagleDrafter, partition: VocabPartition, top_k: int) -> CoralDrafter:
        config = CoralConfig(body.config, partition.num_groups, top_k, partition.strategy)
        return cls(config, partition, body)


def check_row_to_token(row_to_token: torch.Tensor, config, where: str) -> VocabPartition:
    """The checkpoint's group map (a CORAL or CORAL-3 config's N groups) as a VocabPartition,
    or a one-line CheckpointError."""
    if row_to_token.dtype != torch.int64:
        raise CheckpointError(f"{where}: {ROW_TO_TOKEN} must be int64, got {row_to_token.dtype}")
    try:
        return VocabPartition(row_to_token, config.num_groups, config.partition)
    except ValueError as e:
        raise CheckpointError(f"{where}: bad group map {ROW_TO_TOKEN} ({e})") from None



FAMILY = DrafterFamily(
    name="coral",
    config_cls=CoralConfig,
    model_cls=CoralDrafter,
    serve=ServeSpec(method="eagle", architecture=ARCHITECTURE,
                    vllm_class="vllm_coral.plugin.coral:EagleCoralLlamaForCausalLM",
                    speculative_config={"use_local_argmax_reduction": True}),
    recipes={"coral-router": "vllm_coral.training.router:ROUTER"},
    description="CORAL: an EAGLE body plus an LM-head router over vocabulary groups (plugin architecture)",
)
