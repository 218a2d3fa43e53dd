"""Vocabulary partitions: every strategy is a balanced permutation, and each does what its
docstring says (frequency ranks, k-means recovers planted clusters)."""

from __future__ import annotations

import pytest
import torch

from vllm_coral.models.vocab_groups import STRATEGIES, VocabPartition, partition_vocab


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("V,N", [(64, 8), (10, 3), (101, 7)])
def test_partition_is_balanced_permutation(strategy, V, N):
    torch.manual_seed(V)
    p = partition_vocab(strategy, N, lm_head=torch.randn(V, 6), token_counts=torch.randint(0, 50, (V,)))
    assert torch.equal(p.row_to_token.sort().values, torch.arange(V))
    G = -(-V // N)
    sizes = torch.bincount(p.token_to_group(), minlength=N)
    assert sizes[:-1].tolist() == [G] * (N - 1) and sizes[-1] == V - (N - 1) * G
    # stored row r holds token row_to_token[r], in group r // G
    assert torch.equal(p.token_to_group()[p.row_to_token], torch.arange(V) // G)


def test_worked_example_from_docstring():
    p = VocabPartition(torch.tensor([3, 0, 4, 1, 2]), 2, "contiguous")
    assert p.group_size == 3
    assert p.token_to_group().tolist() == [0, 1, 1, 0, 0]


def test_frequency_puts_most_frequent_tokens_first():
    counts = torch.tensor([5, 100, 0, 7, 100, 1, 50, 3])
    p = partition_vocab("frequency", 4, token_counts=counts)
    # ranks: 1 and 4 (100, tie by id), 6 (50), 3 (7), 0 (5), 7 (3), 5 (1), 2 (0)
    assert p.row_to_token.tolist() == [1, 4, 6, 3, 0, 7, 5, 2]


def test_contiguous_is_identity():
    assert torch.equal(partition_vocab("contiguous", 4, vocab_size=12).row_to_token, torch.arange(12))


def test_kmeans_recovers_planted_clusters():
    """Four tight clusters of 25 rows around orthogonal directions, shuffled: balanced
    k-means with N=4 must put each cluster in one group."""
    torch.manual_seed(0)
    centers = torch.eye(4, 16) * 5
    labels = torch.arange(4).repeat_interleave(25)
    head = centers[labels] + 0.1 * torch.randn(100, 16)
    perm = torch.randperm(100)
    head, labels = head[perm], labels[perm]
    p = partition_vocab("kmeans", 4, lm_head=head, seed=3)
    groups = p.token_to_group()
    for g in range(4):
        assert labels[groups == g].unique().numel() == 1


def test_group_mass_and_grouped_weight():
    torch.manual_seed(1)
    p = partition_vocab("kmeans", 3, lm_head=torch.randn(10, 4))  # ragged: 4, 4, 2
    probs = torch.rand(5, 10).softmax(-1)
    mass = p.group_mass(probs)
    t2g = p.token_to_group()
    want = torch.stack([probs[:, t2g == g].sum(-1) for g in range(3)], dim=1)
    torch.testing.assert_close(mass, want)
    w = torch.randn(10, 4)
    gw = p.grouped_weight(w)
    assert torch.equal(gw[2], w[p.row_to_token[2]])


def test_bad_partitions_are_rejected():
    with pytest.raises(ValueError, match="not a permutation"):
        VocabPartition(torch.tensor([0, 0, 2]), 2, "contiguous")
    with pytest.raises(ValueError, match="last group empty"):
        VocabPartition(torch.arange(10), 6, "contiguous")  # G = 2: 5 groups cover all 10
    with pytest.raises(ValueError, match="unknown partition"):
        partition_vocab("random", 2, vocab_size=10)
    with pytest.raises(ValueError, match="needs token_counts"):
        partition_vocab("frequency", 2, vocab_size=10)


def test_impossible_group_count_is_one_line():
    # 41 rows in 8 groups of ceil(41/8) = 6 would leave the last group empty
    with pytest.raises(ValueError, match="41 rows cannot make 8 groups of equal size"):
        partition_vocab("kmeans", 8, lm_head=torch.randn(41, 4))
