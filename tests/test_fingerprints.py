"""Content hashes of what a stage reads (hcm/fingerprints.py): cached while a file's size and
mtime stay, recomputed when it is rewritten, a hub model by its cached revision."""

from __future__ import annotations

import json
import os

from hcm import fingerprints


def test_hash_is_cached_by_size_and_mtime_and_redone_on_a_rewrite(tmp_path):
    f, cache = tmp_path / "w.safetensors", tmp_path / "cache.json"
    f.write_bytes(b"abc")
    expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc")
    assert fingerprints.sha256_file(f, cache) == expected
    # the cache is read while size and mtime match: plant a marker value to see it used
    entries = json.loads(cache.read_text())
    entries[str(f.resolve())][1] = "from-cache"
    cache.write_text(json.dumps(entries))
    assert fingerprints.sha256_file(f, cache) == "from-cache"
    stat = f.stat()
    f.write_bytes(b"abd")  # same size; a new mtime (forced, for coarse filesystem clocks)
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert fingerprints.sha256_file(f, cache) not in ("from-cache", expected)


def test_inputs_cover_manifests_and_every_file_of_a_local_model(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (model / name).write_text(name)
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("{}\n")
    found = fingerprints.inputs([manifest], str(model), built=False, cache=None)
    assert sorted(found) == sorted(
        str(p.resolve())
        for p in [
            manifest,
            *(model / n for n in ("config.json", "model.safetensors", "tokenizer.json")),
        ]
    )
    # a model built from the config's own sizes (the tiny model) is identified by the config
    assert list(fingerprints.inputs([manifest], str(model), built=True, cache=None)) == [
        str(manifest.resolve())
    ]
    assert fingerprints.changed(found, None) == ([], [])
    (model / "model.safetensors").write_text("refreshed")  # the base model replaced in place
    (model / "tokenizer.json").unlink()
    differ, missing = fingerprints.changed(found, None)
    assert differ == [str((model / "model.safetensors").resolve())]
    assert missing == [str((model / "tokenizer.json").resolve())]


def test_a_hub_model_is_identified_by_its_cached_revision(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    repo = hub / "models--OpenGVLab--InternVL3-2B-hf"
    assert fingerprints.hub_revision("OpenGVLab/InternVL3-2B-hf") == "unresolved"
    for rev in ("a" * 40, "b" * 40):
        (repo / "snapshots" / rev).mkdir(parents=True)
        (repo / "snapshots" / rev / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    found = fingerprints.inputs([], "OpenGVLab/InternVL3-2B-hf", built=False, cache=None)
    assert found == {"hub:OpenGVLab/InternVL3-2B-hf": "a" * 40}
    (repo / "refs" / "main").write_text("b" * 40)  # a newer revision downloaded since
    assert fingerprints.changed(found, None)[0] == [
        f"hub:OpenGVLab/InternVL3-2B-hf (revision {'a' * 40} -> {'b' * 40})"
    ]
