"""Training features == what vLLM hands an EAGLE drafter at serving time.

vLLM runs the target on a chat prompt with a recording EAGLE drafter
(vllm_coral/plugin/recorder.py), which saves the hidden states it receives; on the first
drafting step of a request they are the target's features for every prompt token. We
extract features for the same conversation with ``extract_features`` (HF transformers,
fp32) and compare.

Tolerance: both sides are fp32 runs of the same weights through different kernels
(vLLM's CPU attention and fused RMSNorm vs transformers' SDPA), 30 layers deep. Measured
on these prompts: max|Δ| = 2.3e-6 x max|f|, cosine >= 0.9999998 at every token. We require
max|Δ| <= 1e-4 x max|f| (40x margin for other CPUs' summation orders) and cosine > 0.99999.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

from vllm_coral.models.eagle import EagleConfig, EagleDrafter  # noqa: E402
from vllm_coral.models.registry import save_drafter  # noqa: E402
from vllm_coral.training.features import extract_features, iter_shards  # noqa: E402

PROMPTS = ["What is the capital of France?", "Write one sentence about rivers."]


def test_features_match_vllm_drafter_inputs(target_path, tmp_path, monkeypatch):
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from vllm_coral.plugin.engine import engine_kwargs, open_llm

    target_config = json.loads((target_path / "config.json").read_text())
    ckpt = save_drafter(EagleDrafter(EagleConfig.from_target(target_config)), tmp_path / "recorder",
                        family="eagle", recipe="eagle")
    hf = json.loads((ckpt / "config.json").read_text())
    hf["architectures"] = ["EagleRecorderLlamaForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(hf))
    record_dir = tmp_path / "records"
    monkeypatch.setenv("VLLM_CORAL_RECORD_DIR", str(record_dir))

    spec = {"method": "eagle", "model": str(ckpt), "num_speculative_tokens": 1}
    kwargs = engine_kwargs(target_path, dtype="float32", speculative_config=spec, enable_prefix_caching=False)
    answers = []
    with open_llm(**kwargs) as llm:
        for p in PROMPTS:  # one request at a time: each first drafting step sees one prompt
            out = llm.chat([{"role": "user", "content": p}], SamplingParams(temperature=0, max_tokens=8))
            answers.append(out[0].outputs[0].text)

    conversations = tmp_path / "conv.jsonl"
    conversations.write_text(
        "".join(
            json.dumps({"id": str(i), "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}) + "\n"
            for i, (p, a) in enumerate(zip(PROMPTS, answers))
        )
    )
    extract_features(target_path, conversations, tmp_path / "feats", dtype="float32")
    (shard,) = list(iter_shards(tmp_path / "feats"))

    calls = [load_file(str(p)) for p in sorted(record_dir.glob("call_*.safetensors"))]
    tok = AutoTokenizer.from_pretrained(target_path)
    for (ids, mask, feats), prompt in zip(shard.sequences(), PROMPTS):
        prompt_ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        n = len(tok(prompt_ids, add_special_tokens=False)["input_ids"])
        assert mask[:n].sum() == 0 and mask[n:].sum() > 0  # only the answer is trained on
        # vLLM shifts input ids left by one: the drafter at position t sees token t+1.
        match = [c for c in calls if c["positions"].numel() == n and torch.equal(c["input_ids"][: n - 1], ids[1:n].long())]
        assert match, "no recorded drafter call carried this prompt"
        served = match[0]["hidden_states"]
        ours = feats[:n].float()
        scale = ours.abs().max()
        assert (served - ours).abs().max() <= 1e-4 * scale, float((served - ours).abs().max() / scale)
        cos = torch.nn.functional.cosine_similarity(served, ours, dim=-1)
        print(f"fidelity {prompt!r}: max|d|/max|f| = {float((served - ours).abs().max() / scale):.2e}, min cos = {float(cos.min()):.7f}")
        assert cos.min() > 0.99999, float(cos.min())
