"""Speculative-decoding acceptance, read from vLLM's own metrics.

vLLM (v1) counts, per engine:

- ``vllm:spec_decode_num_drafts``: verification steps that carried a draft;
- ``vllm:spec_decode_num_draft_tokens``: draft tokens proposed;
- ``vllm:spec_decode_num_accepted_tokens``: draft tokens accepted;
- ``vllm:spec_decode_num_accepted_tokens_per_pos``: accepted tokens by draft position.

From these: acceptance at position i is ``accepted_per_pos[i] / drafts`` (a chain, so it
is non-increasing in i); the draft acceptance rate is ``accepted / draft_tokens``; and the
mean acceptance length τ, the tokens one target forward yields, is
``1 + accepted / drafts`` (the accepted drafts plus the token the target itself emits).
Worked example: 2 drafts of k=3, accepting [a, a, r] and [a, r, r] -> per_pos [2, 1, 0],
accepted 3, τ = 1 + 3/2 = 2.5.

The same numbers come either from ``LLM.get_metrics()`` (offline) or from the server's
Prometheus text at ``/metrics`` (names with a ``_total`` suffix and a ``position`` label).
Counters are cumulative per engine, so measure a run as the difference of two snapshots.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

__all__ = ["SpecDecodeCounters"]

_PREFIX = "vllm:spec_decode_"


@dataclass(frozen=True)
class SpecDecodeCounters:
    # Verification steps that carried a draft.
    num_drafts: int = 0
    # Draft tokens proposed.
    num_draft_tokens: int = 0
    # Draft tokens accepted.
    num_accepted_tokens: int = 0
    # [num_speculative_tokens] accepted tokens by draft position.
    accepted_per_pos: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def from_metrics(cls, metrics: Iterable[object]) -> SpecDecodeCounters:
        """From ``LLM.get_metrics()`` (``vllm.v1.metrics.reader`` Counter/Vector objects)."""
        scalars: dict[str, int] = {}
        per_pos: list[int] = []
        for m in metrics:
            name = getattr(m, "name", "")
            if not name.startswith(_PREFIX):
                continue
            key = name[len(_PREFIX) :]
            if key == "num_accepted_tokens_per_pos":
                values = list(m.values)
                per_pos = [a + b for a, b in zip(_pad(per_pos, len(values)), values)]
            else:
                scalars[key] = scalars.get(key, 0) + int(m.value)
        return cls(
            num_drafts=scalars.get("num_drafts", 0),
            num_draft_tokens=scalars.get("num_draft_tokens", 0),
            num_accepted_tokens=scalars.get("num_accepted_tokens", 0),
            accepted_per_pos=tuple(per_pos),
        )

    @classmethod
    def from_dict(cls, d: dict) -> SpecDecodeCounters:
        """Back from :meth:`to_dict` (a benchmark row's ``spec_counters``)."""
        return cls(num_drafts=int(d["num_drafts"]), num_draft_tokens=int(d["num_draft_tokens"]),
                   num_accepted_tokens=int(d["num_accepted_tokens"]),
                   accepted_per_pos=tuple(int(a) for a in d["accepted_per_pos"]))  # fmt: skip

    @classmethod
    def from_prometheus_text(cls, text: str) -> SpecDecodeCounters:
        """From the server's ``/metrics`` body (Prometheus text exposition format)."""
        from prometheus_client.parser import text_string_to_metric_families

        scalars: dict[str, float] = {}
        per_pos: dict[int, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if not sample.name.startswith(_PREFIX) or not sample.name.endswith("_total"):
                    continue
                key = sample.name[len(_PREFIX) : -len("_total")]
                if key == "num_accepted_tokens_per_pos":
                    pos = int(sample.labels["position"])
                    per_pos[pos] = per_pos.get(pos, 0.0) + sample.value
                else:
                    scalars[key] = scalars.get(key, 0.0) + sample.value
        positions = range(max(per_pos) + 1) if per_pos else range(0)
        return cls(
            num_drafts=int(scalars.get("num_drafts", 0)),
            num_draft_tokens=int(scalars.get("num_draft_tokens", 0)),
            num_accepted_tokens=int(scalars.get("num_accepted_tokens", 0)),
            accepted_per_pos=tuple(int(per_pos.get(i, 0)) for i in positions),
        )

    def __sub__(self, earlier: SpecDecodeCounters) -> SpecDecodeCounters:
        n = max(len(self.accepted_per_pos), len(earlier.accepted_per_pos))
        return SpecDecodeCounters(
            num_drafts=self.num_drafts - earlier.num_drafts,
            num_draft_tokens=self.num_draft_tokens - earlier.num_draft_tokens,
            num_accepted_tokens=self.num_accepted_tokens - earlier.num_accepted_tokens,
            accepted_per_pos=tuple(
                a - b
                for a, b in zip(_pad(self.accepted_per_pos, n), _pad(earlier.accepted_per_pos, n))
            ),
        )

    def __add__(self, other: SpecDecodeCounters) -> SpecDecodeCounters:
        """Counts of two runs together (e.g. the turns of one benchmark row)."""
        n = max(len(self.accepted_per_pos), len(other.accepted_per_pos))
        return SpecDecodeCounters(
            num_drafts=self.num_drafts + other.num_drafts,
            num_draft_tokens=self.num_draft_tokens + other.num_draft_tokens,
            num_accepted_tokens=self.num_accepted_tokens + other.num_accepted_tokens,
            accepted_per_pos=tuple(
                a + b for a, b in zip(_pad(self.accepted_per_pos, n), _pad(other.accepted_per_pos, n))
            ),
        )

    @property
    def mean_acceptance_length(self) -> float:
        """τ: tokens produced per target forward that carried a draft (1 when none)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    @property
    def draft_acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def acceptance_per_position(self) -> list[float]:
        """[num_speculative_tokens] fraction of drafts whose position i was accepted."""
        if not self.num_drafts:
            return [0.0] * len(self.accepted_per_pos)
        return [a / self.num_drafts for a in self.accepted_per_pos]

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "accepted_per_pos": list(self.accepted_per_pos),
            "mean_acceptance_length": self.mean_acceptance_length,
            "draft_acceptance_rate": self.draft_acceptance_rate,
            "acceptance_per_position": self.acceptance_per_position,
        }

    def row_fields(self) -> dict:
        """What a benchmark row records from these counters (offline, served, or merged repeats)."""
        return {
            "spec_counters": self.to_dict(),
            "mean_acceptance_length": self.mean_acceptance_length,
            "acceptance_per_position": self.acceptance_per_position,
            "draft_acceptance_rate": self.draft_acceptance_rate,
        }


def _pad(values: Iterable[int], n: int) -> list[int]:
    values = list(values)
    return values + [0] * (n - len(values))
