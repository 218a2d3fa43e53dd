"""Our EAGLE-3 checkpoints in real vLLM: plain vLLM serves them losslessly, and vLLM's
drafter computes what our plain-torch ``Eagle3Drafter`` (the model we train) computes.

A recording drafter (``vllm_coral.plugin.recorder.Eagle3RecorderLlamaForCausalLM``)
saves, on every call, the target's aux hidden states it fuses and the outputs it returns.
On a request's first drafting step (the whole prompt, fresh KV cache) our drafter, given
the same token ids, positions and aux states, must return the same (normed, prenorm)
outputs; and the aux states vLLM hands over must be the ones ``data features
--aux-layers`` stores for training. Random weights: this proves format and numerics, not
speed (benchmarks measure trained drafters).

Tolerance as in test_feature_fidelity.py: fp32 on both sides, different kernels.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

from vllm_coral.models.eagle3 import Eagle3Config, Eagle3Drafter  # noqa: E402
from vllm_coral.models.registry import save_drafter  # noqa: E402
from vllm_coral.models.target import TargetHead  # noqa: E402

from .conftest import CONVERSATIONS, MAX_TOKENS  # noqa: E402

PROMPT = "Write one sentence about rivers."


def _random_eagle3(target_path, out, layers=1, draft_vocab=None):
    torch.manual_seed(0)
    model = Eagle3Drafter(Eagle3Config.from_target(json.loads((target_path / "config.json").read_text()),
                                                   num_hidden_layers=layers, draft_vocab_size=draft_vocab))  # fmt: skip
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    if draft_vocab:  # any distinct ids will do for plumbing: every other token of the vocabulary
        model.set_draft_vocab(torch.arange(draft_vocab) * 2, TargetHead.load(target_path).lm_head)
    return model, save_drafter(model, out, family="eagle3", recipe="eagle3")


def test_plain_vllm_serves_our_eagle3_checkpoint_losslessly(target_path, target_greedy, tmp_path, monkeypatch):
    from vllm import SamplingParams

    from vllm_coral.plugin.engine import engine_kwargs, open_llm, timed_chat

    # two layers and a reduced draft vocabulary: vLLM's multi-layer and d2t paths
    _, ckpt = _random_eagle3(target_path, tmp_path / "eagle3-random", layers=2, draft_vocab=8192)
    monkeypatch.setenv("VLLM_PLUGINS", "none")  # plain vLLM: no vllm-coral code in the engine
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    spec = {"method": "eagle3", "model": str(ckpt), "num_speculative_tokens": 3}
    with open_llm(**engine_kwargs(target_path, dtype="float32", speculative_config=spec)) as llm:
        run = timed_chat(llm, CONVERSATIONS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    assert run.spec.num_drafts > 0, "vLLM did not speculate with the checkpoint"
    assert run.token_ids == target_greedy.token_ids


def test_vllm_eagle3_drafter_computes_what_we_train(target_path, tmp_path, monkeypatch):
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from vllm_coral.plugin.engine import engine_kwargs, open_llm
    from vllm_coral.training.features import extract_features
    from vllm_coral.training.dataset import FeatureDataset

    model, ckpt = _random_eagle3(target_path, tmp_path / "recorder")
    hf = json.loads((ckpt / "config.json").read_text())
    hf["architectures"] = ["Eagle3RecorderLlamaForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(hf))
    monkeypatch.setenv("VLLM_CORAL_RECORD_DIR", str(tmp_path / "records"))
    spec = {"method": "eagle3", "model": str(ckpt), "num_speculative_tokens": 2}
    with open_llm(**engine_kwargs(target_path, dtype="float32", speculative_config=spec, enable_prefix_caching=False)) as llm:
        answer = llm.chat([{"role": "user", "content": PROMPT}], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text

    tok = AutoTokenizer.from_pretrained(target_path)
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    records = sorted((tmp_path / "records").glob("*.safetensors"))
    calls = [load_file(str(p)) for p in records if p.name.startswith("call_")]
    combines = [load_file(str(p)) for p in records if p.name.startswith("combine_")]
    first = [c for c in calls if c["positions"].numel() == n and int(c["positions"][0]) == 0]
    fused = [c for c in combines if c["aux"].shape[0] == n]
    assert first and fused, "no recorded first drafting step carried the prompt"
    call, comb = first[-1], fused[-1]

    conv = tmp_path / "conv.jsonl"
    conv.write_text(json.dumps({"id": "0", "messages": [{"role": "user", "content": PROMPT},
                                                        {"role": "assistant", "content": answer}]}) + "\n")  # fmt: skip
    extract_features(target_path, conv, tmp_path / "feats", dtype="float32", aux_layers=model.config.aux_layers)
    ours_aux = FeatureDataset(tmp_path / "feats", 1024, 576, aux=True).collate([0], torch.Generator()).aux[0, :n]
    _close(comb["aux"], ours_aux, "aux hidden states (vLLM's vs our training features)")

    head = TargetHead.load(target_path)
    with torch.no_grad():
        _close(comb["fused"], model.combine(comb["aux"]), "fc(aux)")
        normed, prenorm = model(head.embed_ids(call["input_ids"].long())[None], call["hidden_states"][None],
                                call["positions"].long())  # fmt: skip
    _close(call["normed"], normed[0], "drafter output (normed)")
    _close(call["prenorm"], prenorm[0], "drafter output (prenorm)")


def _close(served: torch.Tensor, ours: torch.Tensor, what: str) -> None:
    scale = ours.abs().max()
    rel = float((served - ours).abs().max() / scale)
    cos = float(torch.nn.functional.cosine_similarity(served, ours, dim=-1).min())
    print(f"{what}: max|d|/max = {rel:.2e}, min cos = {cos:.7f}")
    assert rel <= 1e-4 and cos > 0.99999, (what, rel, cos)
