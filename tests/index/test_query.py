import pytest

from mmfusion.index.query import Term, parse_date, parse_query
from tests.utils import photo


def test_tokens_signs_weights_and_kinds(tmp_path):
    img = str(photo(tmp_path / "holiday.jpg"))
    terms = parse_query(["beach", "+", img, "-", "people", "+", "0.5*sunset", "id:42"])
    assert terms == [
        Term(1.0, "text", "beach"),
        Term(1.0, "image", img),
        Term(-1.0, "text", "people"),
        Term(0.5, "text", "sunset"),
        Term(1.0, "id", 42),
    ]
    assert parse_query(f"'a dog on a beach' - {img}") == [
        Term(1.0, "text", "a dog on a beach"),
        Term(-1.0, "image", img),
    ]
    assert parse_query(["-", "2*rain"]) == [Term(-2.0, "text", "rain")]


def test_bad_queries_say_what_to_write():
    with pytest.raises(ValueError, match="ends with"):
        parse_query(["sea", "+"])
    with pytest.raises(ValueError, match="empty query"):
        parse_query(["  "])
    with pytest.raises(ValueError, match="no such image file"):
        parse_query(["nowhere/photo.png"])


def test_dates():
    assert parse_date("1970-01-02") == 86400.0
    assert parse_date(None) is None
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        parse_date("yesterday")
