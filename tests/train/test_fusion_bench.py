"""`mmfusion bench fusion` on a tiny budget: every output is written and the table has every row."""

import json

from mmfusion.cli.main import main


def test_bench_fusion_tiny(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["-q", "bench", "fusion", "--out", str(out), "--tasks", "correspondence", "--strategies", "concat",
               "late", "--seeds", "0", "1", "--steps", "3", "--train-size", "64", "--test-size", "32",
               "--batch-size", "16", "--dropout-seeds", "1"])  # fmt: skip
    assert rc == 0
    report = json.loads((out / "fusion_bench.json").read_text())
    rows = report["results"]["correspondence"]
    assert set(rows) == {"concat", "late", "image only", "audio only", "concat +modality dropout",
                         "late +modality dropout"}  # fmt: skip
    assert len(rows["concat"]["accuracies"]) == 2 and len(rows["late +modality dropout"]["accuracies"]) == 1
    assert set(rows["concat"]["missing_modality_accuracy"]) == {"image", "audio"}
    assert rows["image only"]["modalities"] == ["image"] and rows["concat"]["params"] > rows["audio only"]["params"]
    assert (out / "fusion_bench.png").stat().st_size > 1000
    table = (out / "fusion_bench.md").read_text()
    assert "| late |" in table and "Why late fusion fails" in table
    assert "| image only |" in capsys.readouterr().out


def test_unknown_strategy_is_named(tmp_path, capsys):
    rc = main(["bench", "fusion", "--out", str(tmp_path), "--strategies", "magic"])
    assert rc == 2 and "magic" in capsys.readouterr().err
