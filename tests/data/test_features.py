"""Feature files for fusion training: .npz and .parquet, string labels, missing modalities, clear errors."""

import numpy as np
import pytest
import torch

from mmfusion.data.features import MultimodalData, load_feature_file


def _arrays(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(n, 8)).astype(np.float32),
        "audio": rng.normal(size=(n, 5, 4)).astype(np.float32),  # tokens
        "labels": np.array(["cat", "dog", "bird", "dog"] * (n // 4)),
    }


def test_npz_with_string_labels_and_presence(tmp_path):
    a = _arrays()
    present = np.ones(40, dtype=bool)
    present[::5] = False
    np.savez(tmp_path / "f.npz", **a, audio_present=present)
    d = load_feature_file(tmp_path / "f.npz")
    assert d.class_names == ["bird", "cat", "dog"] and d.labels[:4].tolist() == [1, 2, 0, 2]
    assert d.features["audio"].shape == (40, 5, 4) and d.dims() == {"image": 8, "audio": 4}
    assert d.present["audio"].sum() == 32 and "image" not in d.present
    train, test = d.split(0.25, seed=0)
    assert len(train) + len(test) == 40
    for c in range(3):  # stratified: every class keeps its share
        frac = (test.labels == c).sum().item() / (d.labels == c).sum().item()
        assert 0.15 <= frac <= 0.35
    assert set(train.features["image"][:, 0].tolist()).isdisjoint(test.features["image"][:, 0].tolist())


def test_integer_labels_with_names(tmp_path):
    a = _arrays()
    a["labels"] = np.arange(40) % 3
    np.savez(tmp_path / "f.npz", **a, class_names=np.array(["a", "b", "c"]))
    assert load_feature_file(tmp_path / "f.npz").class_names == ["a", "b", "c"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.pop("labels"), "no 'labels'"),
        (lambda a: a.update(image=a["image"][:10]), "10 rows"),
        (lambda a: a.update(image=np.full((40, 8), np.nan, dtype=np.float32)), "NaN"),
        (lambda a: a.update(text=np.array(["x"] * 40)), "numeric"),
        (lambda a: a.update(video_present=np.ones(40, bool)), "names no modality"),
        (lambda a: a.update(image_present=np.zeros(40, bool), audio_present=np.zeros(40, bool)), "no modality present"),
    ],
)
def test_bad_files_say_what_is_wrong(tmp_path, change, message):
    a = _arrays()
    change(a)
    np.savez(tmp_path / "f.npz", **a)
    with pytest.raises(ValueError, match=message):
        load_feature_file(tmp_path / "f.npz")


def test_missing_file_and_wrong_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such feature file"):
        load_feature_file(tmp_path / "nope.npz")
    (tmp_path / "f.csv").write_text("x")
    with pytest.raises(ValueError, match=".npz or .parquet"):
        load_feature_file(tmp_path / "f.csv")


def test_parquet_with_missing_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rng = np.random.default_rng(0)
    image = [rng.normal(size=6).tolist() for _ in range(12)]
    audio = [rng.normal(size=3).tolist() if i % 4 else None for i in range(12)]
    pq.write_table(
        pa.table({"image": image, "audio": audio, "labels": [i % 2 for i in range(12)]}), tmp_path / "f.parquet"
    )
    d = load_feature_file(tmp_path / "f.parquet")
    assert d.features["image"].shape == (12, 6) and d.features["audio"].shape == (12, 3)
    assert d.present["audio"].tolist() == [bool(i % 4) for i in range(12)]


def test_labels_out_of_range_are_refused():
    with pytest.raises(ValueError, match="labels must lie"):
        MultimodalData({"x": torch.zeros(3, 2)}, torch.tensor([0, 1, 5]), ["a", "b"])
