"""Distillation losses for the small-LM drafter: forward-KL KD, exact TVD, and TVD++.

Source: Goel et al., "Direct Alignment of Draft Model for Speculative Decoding with
Chat-Fine-Tuned LLMs", Qualcomm AI Research 2024, arXiv 2403.00858. The drafter is fine-tuned
on the target's own responses by distilling the target's next-token distributions into it. The
module holds the losses as pure functions, and also the per-sample gradient estimates of TVD++
so that the variance of its estimator can be measured.

Notation: N positions. z [N, V] are the drafter's (student's) logits and q = softmax(z). p [N, V]
is the target's (teacher's) next-token distribution, given as logits or as probabilities.
mask [N] is 1 where the position counts. Every loss is a mean over the masked positions and is
computed in float32, whatever the input dtype.

KD (forward KL)::

    KL(p || q) = sum_v p(v) (log p(v) - log q(v)) = CE(p, q) - H(p)

We return the KL, not the soft cross-entropy. Both have the same gradient in z, because the
teacher entropy H(p) does not depend on the student. But the KL is 0 exactly when q = p, so its
value reads as a distance, and it can be compared across batches whose teacher entropy differs.

TVD::

    TVD(p, q) = 1/2 sum_v |p(v) - q(v)|,   in [0, 1]

It is computed exactly, over the full vocabulary, and differentiated through q. 1 - TVD is the
probability that speculative sampling accepts the drafter's token at the position (Leviathan et
al. 2023). That is why the paper distils with TVD.

TVD++, the derivation. Write s(x) = sign(p(x) - q(x)) and r(x) = 1[p(x) > q(x)]. For the
student's parameters theta, away from ties p(x) = q(x), where |.| has no derivative::

    d TVD / d theta = 1/2 sum_x sign(q(x) - p(x)) dq(x)/dtheta
                    = -1/2 sum_x s(x) q(x) dlog q(x)/dtheta
                    = -1/2 E_{x~q}[ s(x) dlog q(x)/dtheta ]

This is a policy gradient (REINFORCE): minimising TVD maximises the expected reward s(x) of
tokens drawn from the drafter. E_{x~q}[dlog q(x)/dtheta] = sum_x dq(x)/dtheta = 0, so a constant
b can be subtracted from the reward without changing the expectation. With s = 2r - 1::

    d TVD / d theta = -E_{x~q}[ (r(x) - b) dlog q(x)/dtheta ]   for every constant b.

In the logits, d log q(x)/dz = e_x - q, so the exact gradient is::

    dTVD/dz = -q * (r - mu),   mu = E_q[r] = q({x : p(x) > q(x)})                        (1)

At a tie, r = 0 picks the subgradient with s = -1 (tvd_loss's autograd uses sign(0) = 0). Ties
have measure zero for float logits.

TVD++ applies the variance reduction of the policy-gradient literature: it replaces r by the
normalised reward r~(x) = (r(x) - mu) / sigma, where mu and sigma are the reward's mean and
standard deviation. It then minimises one of two surrogates::

    sampled:  L = -1/K sum_k r~(x_k) log q(x_k),     x_1 .. x_K ~ q                      (2)
    exact:    L = -sum_x stopgrad(q(x) r~(x)) log q(x)                                   (3)

If mu and sigma do not depend on the sampled tokens, the gradient of (2),
-1/K sum_k r~(x_k) dlog q(x_k), is an unbiased estimate of the gradient of (3). The gradient of
(3) is exactly -q (r~ - E_q[r~]); when sigma is one constant, that is dTVD/dz / sigma by (1).
The value of either surrogate is not a distance and means nothing; log ``tvd_loss`` to see
the distance.

The choices, stated precisely (the paper's own equation was not found; see "Source" below):

(a) The set over which mu and sigma are taken (``normalize``).
    "pooled" (default): mu per position and sigma per batch.
    mu_i = E_{q_i}[r_i] is taken exactly over the vocabulary under q_i. It is the position's
    value (its expected reward): the baseline that policy-gradient methods learn, which here
    costs one sum over V. sigma^2 = mean_i Var_{q_i}[r_i] = mean_i mu_i (1 - mu_i) is pooled
    over the masked positions of the call, since r is 0/1. It is the variance of the centred
    reward of a token drawn at a uniformly chosen masked position. Neither statistic depends
    on the sampled tokens, so (2) is unbiased, and (3) is the exact TVD gradient / sigma: the
    same direction as TVD, with one step-size scale for the whole batch. This is PPO practice: subtract a per-state value baseline, then scale the
    advantages by one batch-level standard deviation.
    "position": mu_i and sigma_i = sqrt(mu_i (1 - mu_i)), both per position. This is the
    many-sample limit of GRPO's group normalisation (Shao et al. 2024), where a group is the
    samples that share one context, as ours share one position. Each position's gradient is
    multiplied by 1/sigma_i >= 2, and that reweights the positions. The positions with a small
    sigma_i are those where q's mass lies mostly on one side of p, and they are also the
    noisy ones. On the test's random batches, "position" therefore has a higher
    noise-to-signal ratio over the whole batch than "pooled", and on some batches it is
    hardly lower than the raw reward's.
    "batch": one mean and one population standard deviation (ddof 0) of the rewards of all
    sampled tokens at the masked positions of the call. This is the classic REINFORCE
    practice of normalising returns over the batch. It is slightly biased, because the
    statistics include the sample they normalise, and it is a poorer baseline, because one
    constant serves positions of different value. For the exact estimator, "batch" uses the
    same statistics with the samples replaced by their distributions:
    mu_B = mean_i E_{q_i}[r_i] and sigma_B^2 = mean_i E_{q_i}[(r_i - mu_B)^2].
    "center" (r - mu_i, no scaling) and "none" (the raw r: plain TVD written as a policy
    gradient) are ablations.
    sigma is clamped at ``eps``. It is 0 only when r is constant under q. Softmax gives q > 0
    everywhere, so that means r = 0 everywhere, i.e. p = q, and then r - mu = 0 as well.

(b) Exact or sampled expectation (``estimator``).
    "sampled" (default) uses (2). It takes the caller's ``tokens`` [N, K], or draws
    K = ``num_samples`` tokens per position from q (detached) with ``generator``. Variance
    reduction only has a meaning for a sampled estimate, and the paper describes TVD++ in
    those terms. So we take the paper's estimator to be a sampled one, and make it the default.
    "exact" uses (3). It has zero variance, and in (3) a baseline that is constant per position
    cancels (sum_x q(x) dlog q(x) = 0): "exact" is the exact TVD gradient scaled by 1/sigma
    ("pooled", "batch") or by 1/sigma_i ("position"). It costs only the softmax the loss needs
    anyway (V = 49152 is cheap). Prefer it where following the paper literally is not the
    point.
    Tokens the caller passes are used as given. If they are the teacher's generated tokens
    (the distillation data, x ~ p rather than x ~ q), then (2) estimates
    -E_{x~p}[r~ dlog q], which is not the TVD gradient: it lacks the importance weight
    q(x)/p(x). This off-policy form may be what the paper trains with, since its data are the
    target's responses, but we could not confirm it.

(c) The surrogates are (2) and (3), averaged over the masked positions.

Variance, measured by the tests on random (p, q) pairs with V = 8. At one position, sigma is a
constant. Dividing by it scales the estimate's mean and its spread alike: it makes the absolute
variance larger (sigma <= 1/2), and it leaves the noise-to-signal ratio tr(Cov) / |mean|^2
unchanged. The whole reduction of that ratio, against the raw reward r and against the sign
reward, comes from subtracting mu. For a whole batch, "pooled" keeps that reduction, whereas
"position" gives part of it back through its reweighting of positions (see (a)).

Source. The stored copies of the paper we could search describe TVD++ only in the abstract's
words: a "Total Variation Distance++ (TVD++) loss that incorporates variance reduction
techniques inspired from the policy gradient method in reinforcement learning". Those copies
were the arXiv abstract, the opening of ar5iv.labs.arxiv.org/html/2403.00858, and the summaries
on emergentmind.com and sciencestack.ai. The paper's equation for TVD++ (which statistics, which
samples) was not found, and no public implementation of it turned up in the code index
either. The estimator above is our own derivation and our own choices.
"""

from __future__ import annotations

from typing import Literal

import torch

from vllm_coral.training.losses import masked_mean

__all__ = ["Estimator", "Normalize", "kd_loss", "reward_advantages", "tvd_loss", "tvd_pp_loss",
           "tvd_pp_sample_grads"]

Estimator = Literal["sampled", "exact"]
Normalize = Literal["pooled", "position", "batch", "center", "none"]


def _teacher(teacher: torch.Tensor, teacher_is_probs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, V] teacher logits or probabilities -> (p, log p), float32, no gradient."""
    teacher = teacher.detach().float()
    if teacher_is_probs:
        return teacher, teacher.clamp_min(torch.finfo(torch.float32).tiny).log()
    log_p = teacher.log_softmax(-1)
    return log_p.exp(), log_p


def kd_loss(student_logits: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, *,
            teacher_is_probs: bool = False) -> torch.Tensor:
    """Forward KL(p || q), averaged over masked positions (a scalar).

    ``student_logits`` [N, V], ``teacher`` [N, V] logits (or probabilities when
    ``teacher_is_probs``), ``mask`` [N]. A term with p(v) = 0 counts 0.
    """
    p, log_p = _teacher(teacher, teacher_is_probs)
    log_q = student_logits.float().log_softmax(-1)
    per_pos = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)
    return masked_mean(per_pos, mask)


def tvd_loss(student_logits: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, *,
             teacher_is_probs: bool = False) -> torch.Tensor:
    """Exact 1/2 sum_v |p(v) - q(v)| over the full vocabulary, averaged over masked positions.

    ``student_logits`` [N, V], ``teacher`` [N, V], ``mask`` [N]; differentiable through q.
    """
    p, _ = _teacher(teacher, teacher_is_probs)
    q = student_logits.float().softmax(-1)
    return masked_mean(0.5 * (p - q).abs().sum(-1), mask)


def reward_advantages(r: torch.Tensor, q: torch.Tensor, mask: torch.Tensor, normalize: Normalize,
                      tokens: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """The normalised reward r~ of the module docstring's (a), for sampled tokens or for all.

    ``r`` [N, V] is the reward 1[p > q] of every token, ``q`` [N, V] the student's
    distribution, ``mask`` [N] the positions that count (for the "pooled" and "batch"
    statistics). With ``tokens`` [N, K], returns the r~ of the K sampled tokens [N, K]. Without
    ``tokens`` (the exact estimator), returns the r~ of every token [N, V]. Float32.
    """
    rewards = r if tokens is None else r.gather(-1, tokens)
    if normalize == "none":
        return rewards
    mu = (q * r).sum(-1, keepdim=True)  # [N, 1] E_q[r], the position's value
    var = mu * (1 - mu)  # [N, 1] Var_q[r] of a 0/1 reward
    m = mask.float()[:, None]  # [N, 1]
    n_pos = m.sum().clamp_min(1)
    if normalize == "center":
        return rewards - mu
    if normalize == "position":
        return (rewards - mu) / var.clamp_min(0).sqrt().clamp_min(eps)
    if normalize == "pooled":
        return (rewards - mu) / ((var * m).sum() / n_pos).clamp_min(0).sqrt().clamp_min(eps)
    if normalize != "batch":
        raise ValueError(f"unknown normalize {normalize!r}")
    if tokens is None:  # mean_i E_{q_i}[r_i] and mean_i E_{q_i}[(r_i - mu_b)^2]
        mu_b = (mu * m).sum() / n_pos
        var_b = ((q * (r - mu_b) ** 2).sum(-1, keepdim=True) * m).sum() / n_pos
    else:  # the mean and population variance of the sampled rewards at masked positions
        n = (m * rewards.new_ones(rewards.shape)).sum().clamp_min(1)
        mu_b = (rewards * m).sum() / n
        var_b = ((rewards - mu_b) ** 2 * m).sum() / n
    return (rewards - mu_b) / var_b.sqrt().clamp_min(eps)


def tvd_pp_loss(student_logits: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, *,
                estimator: Estimator = "sampled", normalize: Normalize = "pooled",
                tokens: torch.Tensor | None = None, num_samples: int = 1,
                generator: torch.Generator | None = None, teacher_is_probs: bool = False,
                eps: float = 1e-6) -> torch.Tensor:
    """TVD++ surrogate (module docstring, (2) or (3)), averaged over masked positions.

    ``student_logits`` [N, V], ``teacher`` [N, V] logits (or probabilities), ``mask`` [N].
    With ``estimator="sampled"``, ``tokens`` [N, K] (or [N]) gives the tokens to score;
    without it, K = ``num_samples`` tokens per position are drawn from q with ``generator``.
    Only the gradient of the result is meaningful; its value is not a distance.
    """
    p, _ = _teacher(teacher, teacher_is_probs)
    log_q = student_logits.float().log_softmax(-1)
    q = log_q.detach().exp()
    r = (p > q).float()
    if estimator == "exact":
        adv = reward_advantages(r, q, mask, normalize, eps=eps)
        return masked_mean(-(q * adv * log_q).sum(-1), mask)
    if estimator != "sampled":
        raise ValueError(f"unknown estimator {estimator!r}")
    if tokens is None:
        tokens = torch.multinomial(q, num_samples, replacement=True, generator=generator)
    tokens = tokens.reshape(q.shape[0], -1)
    adv = reward_advantages(r, q, mask, normalize, tokens, eps)
    return masked_mean(-(adv * log_q.gather(-1, tokens)).mean(-1), mask)


def tvd_pp_sample_grads(student_logits: torch.Tensor, teacher: torch.Tensor, tokens: torch.Tensor,
                        mask: torch.Tensor | None = None, *, normalize: Normalize = "pooled",
                        teacher_is_probs: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """The per-sample gradient estimates of the sampled TVD++ in the student's logits.

    For the token x = ``tokens[i, k]`` of position i, with advantage a (the normalised reward,
    per ``normalize``), the estimate is::

        g[i, k] = d/dz_i ( -a log q_i(x) ) = -a (e_x - q_i)

    Its mean over x ~ q_i is, by (1) of the module docstring, dTVD_i/dz_i for "none" and
    "center", dTVD_i/dz_i / sigma for "pooled", and dTVD_i/dz_i / sigma_i for "position". It is
    the gradient of position i's term: unlike the loss, it is not divided by the number of
    positions. ``student_logits`` [N, V], ``teacher`` [N, V], ``tokens`` [N, K], ``mask`` [N]
    (for the "pooled" and "batch" statistics; all ones by default). Returns [N, K, V], float32,
    with no graph.
    """
    p, _ = _teacher(teacher, teacher_is_probs)
    q = student_logits.detach().float().softmax(-1)
    mask = torch.ones(q.shape[0], device=q.device) if mask is None else mask
    r = (p > q).float()
    adv = reward_advantages(r, q, mask, normalize, tokens, eps)  # [N, K]
    onehot = torch.nn.functional.one_hot(tokens, q.shape[-1]).float()  # [N, K, V]
    return -adv[..., None] * (onehot - q[:, None, :])
