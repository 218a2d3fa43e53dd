"""Convert drafter checkpoints written before the family registry (schema 1) to schema 2.

Schema 1 kept a copy of the drafter config under ``vllm_coral.config`` (and CORAL's twice,
under ``vllm_coral.coral``), recorded the training recipe as ``vllm_coral.method``, and
could hold absolute paths. Schema 2 (``vllm_coral.models.registry``) rebuilds the config
from the top-level fields vLLM reads and keeps only portable provenance. The tensors are
unchanged; only ``config.json`` is rewritten, after the tensors are checked against the
new config's weight-name map (from the safetensors header).
"""

from __future__ import annotations

import json
from pathlib import Path

from vllm_coral.models.checkpoint import CONFIG_FILE, CheckpointError, read_config, read_tensor_header
from vllm_coral.models.registry import SCHEMA, get_family, parse_drafter_config

__all__ = ["upgrade_checkpoint"]

# schema-1 provenance keys kept (paths are reduced to their last part)
_KEEP = ("step", "router_loss", "heldout", "world_size")


def upgrade_checkpoint(path: str | Path) -> str:
    """Rewrite ``path``'s config.json in schema 2, in place; returns what was done."""
    path = Path(path)
    hf = read_config(path)
    meta = hf.get("vllm_coral") or {}
    if meta.get("schema") == SCHEMA:
        parse_drafter_config(hf, str(path))
        return f"already schema {SCHEMA}"
    family = get_family(str(meta.get("family")))
    if family.name == "coral":
        fields = {k: meta["coral"][k] for k in ("num_groups", "top_k", "partition")}
        recipe = "coral-router"
    else:
        fields, recipe = {}, str(meta.get("method", family.name))
    training = {k: meta[k] for k in _KEEP if k in meta}
    for key in ("target", "features", "drafter"):
        if isinstance(meta.get(key), str):
            training[key] = Path(meta[key]).name
    new = {k: v for k, v in hf.items() if k != "vllm_coral"}
    new["vllm_coral"] = {"schema": SCHEMA, "family": family.name, "recipe": recipe, "config": fields,
                         "training": training}  # fmt: skip
    _, _, config, _ = parse_drafter_config(new, str(path))
    copy = meta.get("config") or {}
    differ = sorted(k for k, v in copy.items() if k in hf and hf[k] != v)
    if differ:
        raise CheckpointError(f"{path}: top-level {', '.join(differ)} disagree with the schema-1 copy; not converted")
    read_tensor_header(path, config.tensor_specs())
    (path / CONFIG_FILE).write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")
    return f"schema 1 -> {SCHEMA} ({family.name}, recipe {recipe})"
