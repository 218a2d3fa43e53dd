"""Correctness guard: at T=0 a speculative method must emit exactly the target's tokens.

Greedy verification accepts a draft token only if it is the target's argmax, so the output
is the target's, token for token, whatever the drafter proposes. Where the two differ, the
usual cause is floating point: verifying k+1 positions in one batched forward sums in a
different order from decoding them one at a time, and a near-tie between the two best
logits can flip. The guard does not judge why; it finds every request whose tokens differ
and where, so the table can report it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["GuardResult", "Mismatch", "compare_tokens"]


@dataclass(frozen=True)
class Mismatch:
    # The request (question id and turn) whose output differs.
    request: str
    # Index of the first differing output token.
    position: int
    # The target's token there, and the method's (None where that output already ended).
    expected: int | None
    got: int | None
    # Output lengths of both.
    expected_len: int
    got_len: int
    # Where the two part, for replay: the request's prompt tokens (chat template applied)
    # + the target's output before ``position``. None when prompts were not given.
    context_token_ids: list[int] | None = None


@dataclass
class GuardResult:
    # Requests compared, and how many were token-identical.
    compared: int
    identical: int
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.identical == self.compared

    def summary(self) -> str:
        return f"{self.identical}/{self.compared}"

    def to_dict(self) -> dict:
        return {"compared": self.compared, "identical": self.identical,
                "mismatches": [asdict(m) for m in self.mismatches]}  # fmt: skip


def compare_tokens(
    reference: dict[str, list[int]],
    candidate: dict[str, list[int]],
    prompts: dict[str, list[int]] | None = None,
) -> GuardResult:
    """Compare outputs request by request (keys are request ids such as ``"81/turn1"``).

    ``prompts`` (request id -> prompt tokens) is copied into each mismatch for replay.

    A request the candidate did not produce counts as a mismatch at position 0.
    Worked example: reference [5, 6, 7], candidate [5, 9, 7] -> first difference at
    position 1, expected 6, got 9.
    """
    result = GuardResult(compared=len(reference), identical=0)
    for request, want in reference.items():
        got = candidate.get(request)
        prompt = (prompts or {}).get(request)
        if got is None:
            result.mismatches.append(Mismatch(request, 0, want[0] if want else None, None, len(want), 0, prompt))
            continue
        if got == want:
            result.identical += 1
            continue
        pos = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        result.mismatches.append(
            Mismatch(
                request=request,
                position=pos,
                expected=want[pos] if pos < len(want) else None,
                got=got[pos] if pos < len(got) else None,
                expected_len=len(want),
                got_len=len(got),
                context_token_ids=None if prompt is None else prompt + want[:pos],
            )
        )
    return result
