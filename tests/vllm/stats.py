"""The T=1 losslessness check shared by the vLLM tests of every drafter family.

vLLM's rejection sampler makes speculative sampling exact only when the drafter's
probabilities handed to it are the ones its drafts were sampled from. The check samples
the 2nd and 3rd generated tokens (the 1st comes from prefill, without speculation) of one
prompt many times, with and without the drafter, and runs a two-sample chi-square test;
the target at T=0.7 against T=1 is the positive control that the test must reject.
"""

from __future__ import annotations

from collections import Counter

import torch

__all__ = ["assert_same_distribution", "chi2_two_sample", "sample_tokens"]

PROMPT = "Say one word that describes the weather today."


def chi2_two_sample(a: Counter, b: Counter, min_count: int = 10) -> tuple[float, int, float]:
    """Chi-square homogeneity test of two samples of tokens; rare tokens pooled. -> (stat, df, p)."""
    keys = [t for t in set(a) | set(b) if a[t] + b[t] >= min_count]
    rows = [[a[t] for t in keys], [b[t] for t in keys]]
    rows[0].append(sum(a.values()) - sum(rows[0]))
    rows[1].append(sum(b.values()) - sum(rows[1]))
    obs = torch.tensor(rows, dtype=torch.float64)
    obs = obs[:, obs.sum(0) > 0]
    expected = obs.sum(1, keepdim=True) * obs.sum(0, keepdim=True) / obs.sum()
    stat = float(((obs - expected) ** 2 / expected).sum())
    df = obs.shape[1] - 1
    p = float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), torch.tensor(stat / 2.0)))
    return stat, df, p


def sample_tokens(llm, prompt: str, n: int, temperature: float) -> list[tuple[int, ...]]:
    """``n`` samples of the first 3 generated tokens of ``prompt``."""
    from vllm import SamplingParams

    messages = [[{"role": "user", "content": prompt}]]
    # One request first, so the n samples below find the prompt's blocks in the prefix cache
    # (samples scheduled together would otherwise all prefill the prompt).
    llm.chat(messages, SamplingParams(max_tokens=1), use_tqdm=False)
    params = SamplingParams(n=n, temperature=temperature, max_tokens=3, ignore_eos=True)
    out = llm.chat(messages, params, use_tqdm=False)[0]
    return [tuple(o.token_ids) for o in out.outputs]


def assert_same_distribution(target_path, spec: dict, name: str, n: int = 800, prompt: str = PROMPT) -> None:
    """Sample with the target alone (T=1 and the T=0.7 control) and with ``spec`` at T=1."""
    from vllm_coral.plugin.engine import engine_kwargs, open_llm
    from vllm_coral.plugin.metrics import SpecDecodeCounters

    with open_llm(**engine_kwargs(target_path, dtype="float32")) as llm:
        target = sample_tokens(llm, prompt, n, 1.0)
        colder = sample_tokens(llm, prompt, n, 0.7)
    spec = {**spec, "draft_sample_method": "probabilistic"}
    with open_llm(**engine_kwargs(target_path, dtype="float32", speculative_config=spec)) as llm:
        before = SpecDecodeCounters.from_metrics(llm.get_metrics())
        drafted = sample_tokens(llm, prompt, n, 1.0)
        counters = SpecDecodeCounters.from_metrics(llm.get_metrics()) - before
    # drafts were made and some, not all, accepted: the rejection sampler did real work
    assert counters.num_draft_tokens > 0 and 0 < counters.num_accepted_tokens < counters.num_draft_tokens, counters
    for pos in (1, 2):
        ref = Counter(s[pos] for s in target)
        stat, df, p = chi2_two_sample(ref, Counter(s[pos] for s in drafted))
        print(f"token {pos + 1}: {name} vs target chi2={stat:.1f} df={df} p={p:.3g}")
        assert p > 1e-3, f"token {pos + 1}: {name}'s sampled distribution differs from the target's (p={p:.2g})"
        stat, df, p_ctrl = chi2_two_sample(ref, Counter(s[pos] for s in colder))
        print(f"token {pos + 1}: T=0.7 vs T=1 control chi2={stat:.1f} df={df} p={p_ctrl:.3g}")
        assert p_ctrl < 1e-3, "the control (T=0.7 vs T=1) was not rejected: the test has no power here"
