"""Packed datasets: append-only gzip parts that round-trip exactly, and refuse corruption."""

from __future__ import annotations

import json

import pytest

from vllm_coral.workflows.pack import pack_dataset, unpack_dataset


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _conv(i):
    # U+2028 and U+0085 are line breaks to str.splitlines(), not to JSON lines
    return {"id": f"c{i}", "messages": [{"role": "user", "content": f"q{i}\u2028x\x85"},
                                        {"role": "assistant", "content": "é"}], "finish": ["stop"]}  # fmt: skip


def test_pack_appends_only_new_conversations_and_round_trips(tmp_path):
    gen, ds = tmp_path / "gen", tmp_path / "ds"
    gen.mkdir()
    _write(gen / "train.jsonl", [_conv(i) for i in range(3)])
    (gen / "heldout.jsonl").write_text(json.dumps(_conv(9)) + "\n" + '{"id": "cut-by-a-ki')  # partial last line
    (gen / "manifest.json").write_text(json.dumps({"options": {"max_tokens": 384}}))
    first = pack_dataset(gen, ds)
    assert first["counts"] == {"train": 3, "heldout": 1} and len(first["parts"]) == 2
    _write(gen / "train.jsonl", [_conv(i) for i in range(5)])  # the run went on
    second = pack_dataset(gen, ds)
    assert [p["file"] for p in second["parts"]] == ["train-00000.jsonl.gz", "heldout-00000.jsonl.gz",
                                                    "train-00001.jsonl.gz"]  # fmt: skip
    assert second["parts"][2]["count"] == 2 and second["counts"] == {"train": 5, "heldout": 1}
    assert pack_dataset(gen, ds)["parts"] == second["parts"]  # nothing new: no new part

    back = tmp_path / "back"
    assert unpack_dataset(ds, back) == {"train": 5, "heldout": 1}
    lines = (back / "train.jsonl").read_text().split("\n")
    assert [json.loads(x) for x in lines if x] == [_conv(i) for i in range(5)]
    assert json.loads((back / "manifest.json").read_text()) == {"options": {"max_tokens": 384}}
    with pytest.raises(ValueError, match="exists; unpack into a new folder"):
        unpack_dataset(ds, back)


def test_corrupted_part_is_refused(tmp_path):
    gen, ds = tmp_path / "gen", tmp_path / "ds"
    gen.mkdir()
    _write(gen / "train.jsonl", [_conv(i) for i in range(3)])
    pack_dataset(gen, ds)
    part = ds / "train-00000.jsonl.gz"
    part.write_bytes(part.read_bytes()[:-5])
    with pytest.raises(ValueError, match="sha256 differs"):
        unpack_dataset(ds, tmp_path / "x")
    part.unlink()
    with pytest.raises(ValueError, match="listed in manifest.json but missing"):
        pack_dataset(gen, ds)
