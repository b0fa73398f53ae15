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
    assert "say which model" in capsys.readouterr().err and not (tmp_path / "new").exists()
    assert main(["search", "--db", str(indexed / "db")]) == 2
    assert "nothing to search for" in capsys.readouterr().err
    assert main(["search", "missing.jpg", "--db", str(indexed / "db")]) == 2
    assert "no such image file" in capsys.readouterr().err
    assert main(["search", "x", "--after", "last week", "--db", str(indexed / "db")]) == 2
    assert "YYYY-MM-DD" in capsys.readouterr().err


def test_check_reports_consistent(indexed, capsys):
    assert main(["index", "check", "--db", str(indexed / "db")]) == 0
    assert "consistent" in capsys.readouterr().out


def test_search_image_errors_name_the_file_and_what_to_do(indexed, tmp_path, monkeypatch, capsys):
    db = str(indexed / "db")
    monkeypatch.chdir(tmp_path)
    photo(tmp_path / "good.jpg", seed=1)
    (tmp_path / "notes.png").write_text("not a picture")
    assert main(["search", "--image", "good.jpg", "--image", "notes.png", "--db", db]) == 2
    err = capsys.readouterr().err
    assert "notes.png: not an image" in err and "use a JPEG, PNG" in err and "good.jpg" not in err
    assert main(["search", "beach", "+", "good.jpg", "--image", "gone.jpg", "--db", db]) == 2
    err = capsys.readouterr().err
    assert "gone.jpg: cannot read" in err and "check the path" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["search", "x", "-k", "0"],
        ["search", "x", "-k", "-1"],
        ["search", "x", "--top", "ten"],
        ["index", "photos", "--batch-size", "0"],
        ["index", "photos", "--workers", "0"],
        ["index", "photos", "--chunk", "-5"],
        ["index", "photos", "--max-pixels", "0"],
    ],
)
def test_counts_and_sizes_below_one_are_argument_errors(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--db", str(tmp_path / "db")])
    err = capsys.readouterr().err
    option = "-k/--top" if argv[2] in ("-k", "--top") else argv[2]
    assert e.value.code == 2 and f"argument {option}: must be a whole number of 1 or more" in err
    assert not (tmp_path / "db").exists()


def test_a_renamed_file_is_reported_as_renamed_only(indexed, tmp_path, capsys):
    for i in range(3):
        photo(tmp_path / "photos" / f"{i}.jpg", seed=i)
    args = ["-q", "index", str(tmp_path / "photos"), "--db", str(tmp_path / "db")]
    assert main([*args, "--model", str(indexed / "clip")]) == 0
    (tmp_path / "photos" / "0.jpg").rename(tmp_path / "photos" / "zero.jpg")
    capsys.readouterr()
    assert main(args) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert "0 added" in line and "1 renamed" in line and "0 removed" in line and "(0 images embedded)" in line


def test_a_failed_first_run_leaves_no_index_behind(indexed, tmp_path, capsys):
    photos = str(indexed / "photos")
    assert main(["index", photos, "--db", str(tmp_path / "new")]) == 2
    assert main(["index", photos, "--db", str(tmp_path / "new"), "--model", str(tmp_path / "no-model")]) == 2
    assert "no-model" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{}")  # a directory, but not a model
    assert main(["index", photos, "--db", str(tmp_path / "mine"), "--model", str(tmp_path / "junk")]) == 2
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
