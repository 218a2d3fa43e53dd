"""CORAL on EAGLE-3: an EAGLE-3 drafter plus CORAL's LM-head router, served through vLLM's
``eagle3`` method (the product drafter of the recipe study's best base).

The body is ``Eagle3Drafter`` unchanged (trained by ``train eagle3-csra`` for CORAL's CSRA,
or plain ``train eagle3``). The router (``vllm_coral.models.coral.Router``) runs on the
body's normed output, the vector the head consumes, and picks k of N groups of the
drafter's *head rows*: the draft vocabulary's Vd rows when the drafter has one, else the
target's V rows. Only those rows are multiplied::

    r       = W2 (silu(W1 n) + n) + b2          # n = norm(r_last) [T, H]; r: [T, N]
    groups  = topk(r, k)                         # [T, k]
    logits  = W_rows[rows of groups] . n         # k*G of the R head rows; -inf elsewhere

and draft row ids map to target token ids as vLLM's ``Eagle3LlamaForCausalLM`` does
(``d2t``). The router is an alternative or a complement to the reduced draft vocabulary:
with the full vocabulary it cuts the 49152-row head to k/N of it without making any token
unreachable; on a draft vocabulary it cuts Vd further.

Checkpoint = the EAGLE-3 tensors + ``router.*`` + ``vocab_groups.row_to_token`` [R] int64,
a permutation of the head rows (row ids in the drafter's head order: draft ids with a
draft vocabulary, token ids without).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from vllm_coral.models.coral import ROW_TO_TOKEN, Router, check_row_to_token, check_routing
from vllm_coral.models.eagle import EagleConfig
from vllm_coral.models.eagle3 import Eagle3Config, Eagle3Drafter
from vllm_coral.models.registry import DrafterFamily, ServeSpec
from vllm_coral.models.vocab_groups import VocabPartition

__all__ = ["ARCHITECTURE", "FAMILY", "Coral3Config", "Coral3Drafter"]

ARCHITECTURE = "Eagle3CoralLlamaForCausalLM"
_FIELDS = ("num_groups", "top_k", "partition")


@dataclass(frozen=True)
class Coral3Config:
    TARGET_FIELDS: ClassVar[tuple[str, ...]] = EagleConfig.TARGET_FIELDS
    # The EAGLE-3 body (layers, aux layers, draft vocabulary).
    eagle3: Eagle3Config
    # Number of groups N of the drafter's head rows.
    num_groups: int
    # Groups computed per drafted token (k).
    top_k: int
    # How the rows were partitioned (vllm_coral.models.vocab_groups.STRATEGIES).
    partition: str

    def __post_init__(self) -> None:
        check_routing(self.num_groups, self.top_k, self.partition, self.head_rows, "head rows")

    @property
    def head_rows(self) -> int:
        return self.eagle3.head_rows

    @property
    def group_size(self) -> int:
        return -(-self.head_rows // self.num_groups)

    @property
    def torch_dtype(self) -> str:
        return self.eagle3.torch_dtype

    @property
    def hidden_size(self) -> int:
        return self.eagle3.hidden_size

    def check_target(self, target_config: Mapping) -> None:
        self.eagle3.check_target(target_config)

    def to_checkpoint(self) -> tuple[dict, dict]:
        """(the EAGLE-3 fields vLLM reads, {num_groups, top_k, partition})."""
        hf, _ = self.eagle3.to_checkpoint()
        return hf, {"num_groups": self.num_groups, "top_k": self.top_k, "partition": self.partition}

    @classmethod
    def from_checkpoint(cls, hf: Mapping, fields: Mapping) -> Coral3Config:
        unknown = sorted(set(fields) - set(_FIELDS))
        if unknown:
            raise ValueError(f"unknown CORAL field(s) {', '.join(unknown)}")
        return cls(eagle3=Eagle3Config.from_checkpoint(hf, {}), **fields)

    @classmethod
    def from_target(cls, target_config: Mapping, **overrides) -> Coral3Config:
        groups = {k: overrides.pop(k) for k in _FIELDS if k in overrides}
        return cls(eagle3=Eagle3Config.from_target(dict(target_config), **overrides),
                   **{"num_groups": 16, "top_k": 2, "partition": "frequency", **groups})  # fmt: skip

    def tensor_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The one weight-name map: EAGLE-3 tensors + router + the row map."""
        H, dtype = self.hidden_size, self.eagle3.layer.dtype
        return {
            **self.eagle3.tensor_specs(),
            "router.w1.weight": ((H, H), dtype),
            "router.w2.weight": ((self.num_groups, H), dtype),
            "router.w2.bias": ((self.num_groups,), dtype),
            ROW_TO_TOKEN: ((self.head_rows,), torch.int64),
        }


class Coral3Drafter(nn.Module):
    """Eagle3Drafter + Router + a partition of its head rows; the twin of the vLLM class."""

    def __init__(self, config: Coral3Config, partition: VocabPartition | None = None,
                 body: Eagle3Drafter | None = None) -> None:  # fmt: skip
        super().__init__()
        R = config.head_rows
        if partition is None:  # identity until a checkpoint's row map is loaded
            partition = VocabPartition(torch.arange(R), config.num_groups, config.partition)
        if partition.num_groups != config.num_groups or partition.vocab_size != R:
            raise ValueError(f"partition ({partition.num_groups} groups over {partition.vocab_size} rows) does not "
                             f"match the config ({config.num_groups} groups over {R} head rows)")  # fmt: skip
        self.config = config
        self.partition = partition
        self.body = body if body is not None else Eagle3Drafter(config.eagle3)
        self.router = Router(config.hidden_size, config.num_groups)

    def head_weight(self, target_head: torch.Tensor) -> torch.Tensor:
        """[R, H] the rows the router groups: the draft head, or the target's head."""
        return self.body.draft_head if self.config.eagle3.draft_vocab_size else target_head

    def routed_logits(self, normed: torch.Tensor, target_head: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, R]
        """Logits over the head rows (draft ids, or token ids without a draft vocabulary),
        only the router's k groups computed, -inf elsewhere."""
        from vllm_coral.models.coral import routed_logits, select_groups

        weight = self.head_weight(target_head).to(normed.dtype)
        groups = select_groups(self.router(normed), self.config.top_k)
        return routed_logits(normed, self.partition.grouped_weight(weight), groups, self.config.group_size,
                             self.partition.row_to_token.to(normed.device))  # fmt: skip

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        tensors = self.body.checkpoint_tensors()
        tensors.update({f"router.{k}": v for k, v in self.router.state_dict().items()})
        tensors[ROW_TO_TOKEN] = self.partition.row_to_token
        return tensors

    def load_checkpoint_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        self.partition = check_row_to_token(tensors.pop(ROW_TO_TOKEN), self.config, "CORAL-3 checkpoint")
        self.router.load_state_dict({k[len("router."):]: tensors.pop(k) for k in list(tensors) if k.startswith("router.")})
        self.body.load_checkpoint_tensors(tensors)

    @classmethod
    def from_eagle3(cls, body: Eagle3Drafter, partition: VocabPartition, top_k: int) -> Coral3Drafter:
        config = Coral3Config(body.config, partition.num_groups, top_k, partition.strategy)
        return cls(config, partition, body)


FAMILY = DrafterFamily(
    name="coral3",
    config_cls=Coral3Config,
    model_cls=Coral3Drafter,
    serve=ServeSpec(method="eagle3", architecture=ARCHITECTURE,
                    vllm_class="vllm_coral.plugin.coral3:Eagle3CoralLlamaForCausalLM",
                    speculative_config={"use_local_argmax_reduction": True}),
    description="CORAL on EAGLE-3: an EAGLE-3 body plus an LM-head router over its head rows (plugin architecture)",
)
