import os

from mmfusion.index.scan import scan
from tests.utils import photo


def test_walk_skips_hidden_and_follows_links_only_inside(tmp_path):
    root = tmp_path / "photos"
    photo(root / "a.jpg")
    photo(root / "sub" / "b.png")
    photo(root / ".hidden" / "c.jpg")
    photo(root / "._a.jpg")
    (root / "notes.txt").write_text("x")
    outside = photo(tmp_path / "elsewhere" / "d.jpg")
    os.symlink(root, root / "sub" / "loop")  # a loop back to the root
    os.symlink(outside.parent, root / "escape")  # a link out of the root
    os.symlink(outside, root / "escape.jpg")
    os.symlink(root / "a.jpg", root / "inside.jpg")  # a link to a file inside: followed
    os.symlink(root / "gone.jpg", root / "broken.jpg")
    r = scan([root])
    names = sorted(os.path.relpath(f.path, root) for f in r.files)
    assert names == ["a.jpg", "inside.jpg", "sub/b.png"]
    reasons = {os.path.relpath(p, root): why for p, why in r.skipped}
    assert "already walked" in reasons["sub/loop"]
    assert "outside" in reasons["escape"] and "outside" in reasons["escape.jpg"]
    assert "broken" in reasons["broken.jpg"]
    assert r.roots == [str(root)] and not r.missing_roots


def test_missing_and_empty_roots_are_reported(tmp_path):
    (tmp_path / "empty").mkdir()
    r = scan([tmp_path / "nope", tmp_path / "empty"])
    assert r.files == [] and r.roots == []
    assert r.missing_roots == [str(tmp_path / "nope"), str(tmp_path / "empty")]


def test_non_utf8_names_survive(tmp_path):
    name = os.fsdecode(b"caf\xe9.png")
    photo(tmp_path / name)
    r = scan([tmp_path])
    assert [os.fsencode(os.path.basename(f.path)) for f in r.files] == [b"caf\xe9.png"]
