"""Generated conversations as small, append-only, committable parts, and back.

``vllm-coral data generate`` takes hours on a CPU, and a later session may start on a fresh
machine with only what was committed. ``pack`` turns a generation folder's
``train.jsonl``/``heldout.jsonl`` into gzip parts that git can hold: each call writes only
the conversations that no earlier part holds, as one new ``<split>-NNNNN.jsonl.gz`` (so
history never re-commits the same bytes), and rewrites ``manifest.json`` (the generation
manifest, the parts with their counts and sha256, totals). ``unpack`` rebuilds the jsonl
files from the parts after checking every hash, so ``data generate`` with the same
options resumes where the packed run stopped (it skips ids already present) and ``data
features`` reads them as usual.

Layout::

    DATASET/manifest.json          {"generation": {...}, "parts": [{"file", "split", "count",
                                    "sha256"}], "counts": {"train": n, "heldout": m}}
    DATASET/train-00000.jsonl.gz   one conversation per line, as data generate wrote it
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

__all__ = ["pack_dataset", "unpack_dataset"]

SPLITS = ("train", "heldout")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_manifest(dataset: Path) -> dict:
    path = dataset / "manifest.json"
    if not path.exists():
        return {"parts": [], "counts": {s: 0 for s in SPLITS}}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def _packed_ids(dataset: Path, manifest: dict) -> set[str]:
    ids: set[str] = set()
    for lines in _iter_parts(dataset, manifest):
        ids.update(json.loads(line)["id"] for line in lines)
    return ids


def _iter_parts(dataset: Path, manifest: dict):
    for part in manifest["parts"]:
        path = dataset / part["file"]
        if not path.is_file():
            raise ValueError(f"{path}: listed in manifest.json but missing")
        if _sha256(path) != part["sha256"]:
            raise ValueError(f"{path}: sha256 differs from manifest.json (corrupted or edited)")
        with gzip.open(path, "rt", encoding="utf-8") as f:
            # split on "\n" only: str.splitlines() also breaks at U+2028, U+0085, ... inside JSON strings
            lines = [line for line in f.read().split("\n") if line.strip()]
        if len(lines) != part["count"]:
            raise ValueError(f"{path}: {len(lines)} conversations, manifest.json says {part['count']}")
        yield lines


def pack_dataset(data: Path, dataset: Path) -> dict:
    """Append the conversations of ``data`` not yet in ``dataset`` as new parts; returns the manifest."""
    dataset.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(dataset)
    seen = _packed_ids(dataset, manifest)
    gen_manifest = data / "manifest.json"
    if gen_manifest.exists():
        manifest["generation"] = json.loads(gen_manifest.read_text())
    for split in SPLITS:
        source = data / f"{split}.jsonl"
        if not source.exists():
            continue
        new = []
        for line in source.read_text(encoding="utf-8").split("\n"):
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill: data generate regenerates it
            if record["id"] not in seen:
                seen.add(record["id"])
                new.append(json.dumps(record, ensure_ascii=False))
        if not new:
            continue
        name = f"{split}-{sum(p['split'] == split for p in manifest['parts']):05d}.jsonl.gz"
        tmp = dataset / (name + ".tmp")
        with gzip.GzipFile(tmp, "wb", mtime=0) as f:  # mtime 0: the same records give the same bytes
            f.write(("\n".join(new) + "\n").encode("utf-8"))
        os.replace(tmp, dataset / name)
        manifest["parts"].append({"file": name, "split": split, "count": len(new), "sha256": _sha256(dataset / name)})
    manifest["counts"] = {s: sum(p["count"] for p in manifest["parts"] if p["split"] == s) for s in SPLITS}
    (dataset / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def unpack_dataset(dataset: Path, data: Path) -> dict[str, int]:
    """Rebuild ``data/{train,heldout}.jsonl`` (+ the generation manifest) from the parts."""
    manifest = _read_manifest(dataset)
    if not manifest["parts"]:
        raise ValueError(f"{dataset}: no packed parts (manifest.json missing or empty)")
    for split in SPLITS:
        if (data / f"{split}.jsonl").exists() and (data / f"{split}.jsonl").stat().st_size:
            raise ValueError(f"{data / f'{split}.jsonl'} exists; unpack into a new folder (nothing is overwritten)")
    data.mkdir(parents=True, exist_ok=True)
    out = {s: [] for s in SPLITS}
    for part, lines in zip(manifest["parts"], _iter_parts(dataset, manifest)):
        out[part["split"]] += lines
    for split, lines in out.items():
        tmp = data / f"{split}.jsonl.tmp"
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        os.replace(tmp, data / f"{split}.jsonl")
    if "generation" in manifest:
        (data / "manifest.json").write_text(json.dumps(manifest["generation"], indent=2) + "\n")
    return {split: len(lines) for split, lines in out.items()}
