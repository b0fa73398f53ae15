"""Ctrl-C and SIGTERM stop an indexing run cleanly: it keeps and reports what it committed, and re-running resumes."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from mmfusion.cli.main import main
from mmfusion.index import Index, IndexInterrupted
from mmfusion.index.store import Store
from mmfusion.index.writer import signals_deferred
from tests.utils import photo, tiny_clip


@pytest.fixture(autouse=True)
def ctrl_c_delivered():
    """A shell that starts the suite in the background (``cmd &`` without job control) hands it SIGINT ignored,
    and Python keeps it so; these tests send Ctrl-C on purpose, so they get Python's usual handler back."""
    before = signal.getsignal(signal.SIGINT)
    if before == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _sigint_default() -> None:
    """In a child about to exec Python: SIGINT back to its default, so Python installs KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("model") / "clip")


def _photos(folder, n):
    for i in range(n):
        photo(folder / f"p{i:03d}.png", seed=i)
    return folder


def _consistent(ix):
    assert ix.check(full=True).problems == []
    assert np.array_equal(np.sort(ix.vi.ids()), ix.store.ids())


def test_ctrl_c_keeps_and_records_what_was_committed(tmp_path, model_dir, monkeypatch):
    photos = _photos(tmp_path / "photos", 12)
    with Index.open(tmp_path / "db", model=model_dir, write=True) as ix:
        embed, calls = ix.query_encoder.encode_pixels, []

        def third_call_interrupted(*a, **k):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return embed(*a, **k)

        monkeypatch.setattr(ix.query_encoder, "encode_pixels", third_call_interrupted)
        with pytest.raises(IndexInterrupted) as e:
            ix.update([photos], batch_size=2, chunk_size=3, commit_every_s=0, workers=2, progress=False)
        report = e.value.report
        assert isinstance(e.value, KeyboardInterrupt) and report.interrupted
        assert report.added == 4 == ix.store.count()  # two batches were embedded, and all of them kept
        assert "interrupted" in report.summary()[0] and "re-run" in report.summary()[1]
        _consistent(ix)
        last = ix.store.last_run()
        assert last["interrupted"] is True and last["added"] == 4 and last["finished"]
    saved = [json.loads(p.read_text()) for p in (tmp_path / "db" / "reports").glob("index-*.json")]
    assert [(r["interrupted"], r["added"]) for r in saved] == [(True, 4)]
    with Index.open(tmp_path / "db", write=True) as ix:  # resumes: only the rest is embedded
        r = ix.update([photos], progress=False)
        assert (r.interrupted, r.added, r.model_calls, r.unchanged, ix.store.count()) == (False, 8, 8, 4, 12)
        _consistent(ix)


def test_an_interrupt_during_a_commit_waits_for_it(tmp_path, model_dir, monkeypatch):
    photos = _photos(tmp_path / "photos", 6)
    insert, calls = Store.insert, []

    def insert_then_ctrl_c(self, rows):
        calls.append(len(rows))
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)  # lands inside the transaction
        return insert(self, rows)

    monkeypatch.setattr(Store, "insert", insert_then_ctrl_c)
    with Index.open(tmp_path / "db", model=model_dir, write=True) as ix:
        with pytest.raises(IndexInterrupted) as e:
            ix.update([photos], batch_size=2, chunk_size=2, commit_every_s=0, progress=False)
        assert e.value.report.added == sum(calls[:2]) == ix.store.count() == len(ix.vi)  # that chunk committed whole
        _consistent(ix)


def test_signals_are_held_while_deferred_then_delivered():
    with pytest.raises(KeyboardInterrupt), signals_deferred():
        signal.raise_signal(signal.SIGINT)
        held = True  # reached: the signal did not interrupt the block
    assert held and signal.getsignal(signal.SIGINT) is signal.default_int_handler


DRIVER = """
import sys, time
from mmfusion.index.encoder import QueryEncoder
embed = QueryEncoder.encode_pixels
def slow(self, *a, **k):  # a real model's pace, so that the signal lands mid-run
    print("embedding", flush=True)
    time.sleep(0.05)
    return embed(self, *a, **k)
QueryEncoder.encode_pixels = slow
from mmfusion.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_the_index_command_stops_cleanly_on_a_signal(tmp_path, model_dir, sig, capsys):
    photos, db = _photos(tmp_path / "photos", 40), tmp_path / "db"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = ["-q", "index", str(photos), "--model", str(model_dir), "--db", str(db), "--batch-size", "2", "--chunk", "2"]
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, preexec_fn=_sigint_default)  # fmt: skip
    for _ in range(3):  # two batches embedded (and committed), the third under way
        assert proc.stdout.readline() == b"embedding\n", proc.stderr.read().decode()
    proc.send_signal(sig)
    out, err = (b.decode() for b in proc.communicate(timeout=60))
    assert proc.returncode == 128 + sig, err  # 130 for SIGINT, 143 for SIGTERM
    summary = [line for line in out.splitlines() if line != "embedding"]
    assert summary[0].startswith("interrupted after") and "re-run the same command to resume" in summary[1]
    with Index.open(db) as ix:
        last = ix.store.last_run()
        assert last["interrupted"] is True and f"committed {last['added']} added" in summary[0]
        assert 4 <= last["added"] == ix.store.count() < 40
    assert main(["index", "info", "--db", str(db)]) == 0
    assert "(interrupted: re-run to finish)" in capsys.readouterr().out
    assert main(["-q", "index", str(photos), "--db", str(db), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["interrupted"] is False and r["added"] == r["model_calls"] == 40 - last["added"]
    with Index.open(db, write=True) as ix:
        assert ix.store.count() == 40
        _consistent(ix)
