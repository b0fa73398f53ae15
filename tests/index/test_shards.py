"""Embedding shards in this process: resumed shard by shard, read back into an index, and clear errors."""

import builtins
import os

import pyarrow.parquet as pq
import pytest

from mmfusion.cli.main import main
from mmfusion.index import Index
from mmfusion.index.collection import load_embedder, model_identity
from mmfusion.index.encoder import QueryEncoder
from mmfusion.index.shards import embed_to_shards, read_manifest, shard_paths
from tests.utils import photo, tiny_clip


@pytest.fixture()
def setup(tmp_path):
    model = tiny_clip(tmp_path / "clip")
    folder = tmp_path / "photos"
    for i in range(120):
        photo(folder / f"p{i:03d}.png", (40, 30), seed=i)
    (folder / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return model, folder, tmp_path / "emb"


def _embed(model, folder, out, **kw):
    m = load_embedder(model)
    return embed_to_shards([folder], out, QueryEncoder(m), model_identity(m, str(model)), progress=False, **kw)


def test_a_finished_shard_is_never_redone(setup):
    model, folder, out = setup
    first = _embed(model, folder, out, shard_size=50)
    assert (first.embedded, len(first.skipped), first.shards_written) == (120, 1, 3)
    shards = shard_paths(out)
    assert [pq.read_metadata(p).num_rows for p in shards] == [50, 50, 21]
    stamps = [p.stat().st_mtime_ns for p in shards[:2]]
    shards[2].unlink()  # as if the run had been killed before its last shard was written
    (out / ".shard-00002.parquet.123.tmp").write_bytes(b"half a shard")  # and had left this behind
    photo(folder / "p000.png", (44, 30), seed=999)  # changed since it was embedded
    photo(folder / "new.png", (40, 30), seed=1000)
    again = _embed(model, folder, out, shard_size=50)
    assert again.already == 99  # shards 0 and 1, less the changed p000
    assert again.embedded == 20 + 2 and len(again.skipped) == 1  # lost shard (20 photos, broken), p000, new
    assert [p.stat().st_mtime_ns for p in shard_paths(out)[:2]] == stamps
    assert not list(out.glob(".*.tmp"))
    assert _embed(model, folder, out, shard_size=50).embedded == 0  # nothing left to do


def test_from_embeddings_takes_the_latest_shard_and_keeps_the_index_model(setup, tmp_path, capsys):
    model, folder, out = setup
    _embed(model, folder, out, shard_size=64)
    photo(folder / "p005.png", (48, 30), seed=555)  # re-embedded into a later shard
    _embed(model, folder, out, shard_size=64)
    assert main(["index", "--from-embeddings", str(out), "--db", str(tmp_path / "db"), "--json"]) == 0
    with Index.open(tmp_path / "plain", model=model, write=True) as ix:
        ix.update([folder], progress=False)
    with Index.open(tmp_path / "db") as a, Index.open(tmp_path / "plain") as b:
        ra = {r.path: r for r in a.store.get(a.store.ids().tolist()).values()}
        rb = {r.path: r for r in b.store.get(b.store.ids().tolist()).values()}
        assert ra.keys() == rb.keys()
        assert all(ra[p].hash == rb[p].hash and ra[p].width == rb[p].width for p in ra)
        assert a.info()["fingerprint"] == b.info()["fingerprint"]
        assert a.search(text="a blue square", k=2)  # the model loaded from the manifest's reference
    # a second build from the same shards changes nothing
    assert main(["index", "--from-embeddings", str(out), "--db", str(tmp_path / "db"), "--json"]) == 0
    assert '"unchanged": 120' in capsys.readouterr().out


def test_errors_name_the_fix(setup, tmp_path, capsys, monkeypatch):
    model, folder, out = setup
    assert main(["index", "--from-embeddings", str(tmp_path), "--db", str(tmp_path / "db")]) == 2
    assert "mmfusion embed PATH --out" in capsys.readouterr().err
    assert main(["index", "--db", str(tmp_path / "db")]) == 2
    assert "mmfusion index PATH --db DB" in capsys.readouterr().err
    _embed(model, folder, out, shard_size=500)
    other = tiny_clip(tmp_path / "other", seed=1)
    assert main(["embed", str(folder), "--model", str(other), "--out", str(out)]) == 2
    assert "write them to another --out" in capsys.readouterr().err
    assert main(["index", "--from-embeddings", str(out), "--db", str(tmp_path / "db"), "--model", str(model)]) == 2
    assert "leave out --model" in capsys.readouterr().err
    with Index.open(tmp_path / "db2", model=other, write=True):
        pass
    assert main(["index", "--from-embeddings", str(out), "--db", str(tmp_path / "db2")]) == 2
    assert "never mixes models" in capsys.readouterr().err
    assert read_manifest(out)["dim"] == load_embedder(model).embed_dim

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    assert main(["index", str(folder), "--db", str(tmp_path / "db3"), "--model", str(model), "--ray"]) == 2
    assert "pip install 'mmfusion[ray]'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "db3")  # refused before anything was created
