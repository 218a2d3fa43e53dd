from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="session")
def tiny_features(target_path, tmp_path_factory):
    """Real SmolLM2 features of a dozen short synthetic conversations (+ EAGLE-3 aux layers)."""
    from vllm_coral.training.features import extract_features

    root = tmp_path_factory.mktemp("tiny_features")
    convs = [
        {"id": f"c{i}", "messages": [
            {"role": "user", "content": f"Tell me fact number {i} about the number {i * 7}."},
            {"role": "assistant", "content": f"The number {i * 7} is {'even' if i % 2 == 0 else 'odd'}, and it is "
                                             f"{i} times seven. It comes after {i * 7 - 1}."},
        ]}
        for i in range(12)
    ]  # fmt: skip
    src = root / "train.jsonl"
    src.write_text("".join(json.dumps(c) + "\n" for c in convs))
    extract_features(target_path, src, root / "train", dtype="float32", shard_tokens=400, aux_layers=(2, 15, 27))
    return root / "train"
