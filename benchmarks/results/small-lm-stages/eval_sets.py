"""Score small-LM drafters on held-out features of greedy and of sampled (T=1) answers (sets_heldout.json).

Run from the folder that holds feat1/heldout (`data features` of the greedy set) and
feat-sampled/heldout (of `datasets/smollm2-135m/sharegpt-t1`, unpacked):
    python eval_sets.py greedy-set=runs/greedy/drafter t1-set=runs/sampled/drafter
"""
import json, sys
import torch
from vllm_coral.models.target import TargetHead
from vllm_coral.models.targets import fetch_target
from vllm_coral.training.dataset import FeatureDataset
from vllm_coral.training.direct_align import DISTILL, DirectAlignConfig, build_small_lm
from vllm_coral.training.evaluate import evaluate

target = fetch_target("smollm2-135m", progress=False)
head = TargetHead.load(target).with_head_dtype(torch.bfloat16)
sets = {"greedy held-out": "feat1/heldout", "T=1 held-out": "feat-sampled/heldout"}
drafters = dict(arg.split("=", 1) for arg in sys.argv[1:])
out = {}
for name, path in drafters.items():
    cfg = DirectAlignConfig(loss="tvd", layers=2, hidden_size=288, init=path)
    data = FeatureDataset(sets["greedy held-out"], 1024, head.hidden_size)
    module = build_small_lm(cfg, head, data)
    for sname, spath in sets.items():
        s = evaluate(DISTILL, cfg, module, head, spath, autocast=torch.autocast("cpu", dtype=torch.bfloat16))
        out[f"{name} | {sname}"] = {k: round(v, 4) for k, v in s.items() if k in ("acc/top1", "loss/tvd", "loss/kd", "tokens")}
        print(name, "|", sname, out[f"{name} | {sname}"], flush=True)
json.dump(out, open("sets_heldout.json", "w"), indent=1)
