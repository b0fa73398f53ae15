import json

import pytest

from mmfusion.cli.main import main
from tests.utils import photo, tiny_clip


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-index")
    model = tiny_clip(root / "clip")
    for i in range(8):
        photo(root / "photos" / f"{i}.jpg", seed=i)
    (root / "photos" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    assert main(["-q", "index", str(root / "photos"), "--model", str(model), "--db", str(root / "db")]) == 0
    return root


def test_index_prints_a_summary_and_info(indexed, capsys):
    assert main(["-q", "index", str(indexed / "photos"), "--db", str(indexed / "db"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["unchanged"] == 8 and report["model_calls"] == 0 and len(report["skipped"]) == 1
    assert main(["index", "info", "--db", str(indexed / "db")]) == 0
    out = capsys.readouterr().out
    assert "images:   8" in out and "search:   flat" in out and "16-d" in out


def test_search_table_json_and_arithmetic(indexed, capsys):
    db = str(indexed / "db")
    assert main(["search", "a red circle", "--db", db, "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:3] == ["#", "score", "id"] and len(lines) == 4
    img = str(indexed / "photos" / "2.jpg")
    assert main(["search", "red", "+", img, "-blue", "--db", db, "--json", "-k", "2"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res) == 2 and {"id", "path", "score", "width"} <= set(res[0])
    assert main(["search", "--like", str(res[0]["id"]), "--db", db, "--json", "-k", "1"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["id"] == res[0]["id"]


def test_errors_name_the_fix(indexed, tmp_path, capsys):
    assert main(["search", "x", "--db", str(tmp_path / "none")]) == 2
    assert "mmfusion index FOLDER --db" in capsys.readouterr().err
    assert main(["index", str(indexed / "photos"), "--db", str(tmp_path / "new")]) == 2
    assert "say which model" in capsys.readouterr().err
    assert main(["search", "--db", str(indexed / "db")]) == 2
    assert "nothing to search for" in capsys.readouterr().err
    assert main(["search", "missing.jpg", "--db", str(indexed / "db")]) == 2
    assert "no such image file" in capsys.readouterr().err
    assert main(["search", "x", "--after", "last week", "--db", str(indexed / "db")]) == 2
    assert "YYYY-MM-DD" in capsys.readouterr().err


def test_check_reports_consistent(indexed, capsys):
    assert main(["index", "check", "--db", str(indexed / "db")]) == 0
    assert "consistent" in capsys.readouterr().out
