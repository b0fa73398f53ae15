"""Labelled multimodal examples as tensors, and the feature files users bring for fusion training.

A feature file is one ``.npz`` (or ``.parquet``) holding, per modality, an array of precomputed features
((N, D) vectors or (N, T, D) token sequences), plus ``labels`` (N,) as integers or strings. Optional:
``<modality>_present`` (N,) booleans where some examples lack a modality (their features are ignored),
and ``class_names`` (C,) naming integer labels. In parquet, each modality is a column of fixed-length
lists (vectors), beside a ``labels`` column; reading it needs ``pyarrow``.

    np.savez("clips.npz", image=img_emb, audio=audio_emb, labels=y, audio_present=has_audio)
    mmfusion train fusion --data clips.npz --strategy attention --epochs 30
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

RESERVED = ("labels", "class_names")


@dataclass
class MultimodalData:
    """Examples with one tensor per modality, integer labels and optional presence masks."""

    features: dict[str, torch.Tensor]
    labels: torch.Tensor  # (N,) int64
    class_names: list[str]
    present: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> (N,) bool
    meta: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.labels)
        for name, t in {**self.features, **{f"{k}_present": v for k, v in self.present.items()}}.items():
            if len(t) != n:
                raise ValueError(f"{name} has {len(t)} rows but there are {n} labels; every array needs one row each")
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.class_names)):
            raise ValueError(f"labels must lie in 0..{len(self.class_names) - 1} (one per class name)")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.features)

    def dims(self) -> dict[str, int]:
        return {k: int(v.shape[-1]) for k, v in self.features.items()}

    def subset(self, index) -> MultimodalData:
        idx = torch.as_tensor(index, dtype=torch.long)
        return MultimodalData(
            {k: v[idx] for k, v in self.features.items()},
            self.labels[idx],
            self.class_names,
            {k: v[idx] for k, v in self.present.items()},
            {k: v[idx.numpy()] for k, v in self.meta.items()},
        )

    def split(self, test_fraction: float, seed: int = 0) -> tuple[MultimodalData, MultimodalData]:
        """A seeded, stratified train/test split (each class keeps its share in both)."""
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
        rng = np.random.default_rng(seed)
        labels = self.labels.numpy()
        test = []
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            test.extend(idx[: int(round(len(idx) * test_fraction))])
        mask = np.zeros(len(labels), dtype=bool)
        mask[test] = True
        return self.subset(np.flatnonzero(~mask)), self.subset(np.flatnonzero(mask))


def load_feature_file(path: str | Path) -> MultimodalData:
    """Read a ``.npz`` or ``.parquet`` feature file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such feature file (a .npz or .parquet with one array per modality)")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except ValueError as e:
            raise ValueError(f"{path}: cannot read ({e}); save with numpy.savez and no object arrays") from e
    elif path.suffix == ".parquet":
        arrays = _read_parquet(path)
    else:
        raise ValueError(f"{path}: feature files are .npz or .parquet, not {path.suffix or 'no suffix'}")
    if "labels" not in arrays:
        raise ValueError(f"{path}: no 'labels' array; found {sorted(arrays)}")
    raw = np.asarray(arrays["labels"])
    if raw.dtype.kind in "US":
        names = sorted({str(x) for x in raw})
        labels = np.searchsorted(np.array(names), raw.astype(str))
    elif raw.dtype.kind in "iu":
        labels = raw.astype(np.int64)
        given = arrays.get("class_names")
        names = [str(x) for x in given] if given is not None else [str(i) for i in range(int(labels.max()) + 1)]
    else:
        raise ValueError(f"{path}: labels must be integers or strings, not {raw.dtype}")
    features, present = {}, {}
    for key, arr in arrays.items():
        if key in RESERVED or key.endswith("_present"):
            continue
        arr = np.asarray(arr)
        if arr.dtype.kind not in "fiu" or arr.ndim not in (2, 3):
            raise ValueError(
                f"{path}: '{key}' must be a numeric (N, D) or (N, T, D) array of features, got {arr.dtype} {arr.shape}"
            )
        if not np.isfinite(arr).all():
            raise ValueError(f"{path}: '{key}' holds NaN or infinite values; mark missing examples with {key}_present")
        features[key] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    for key, arr in arrays.items():
        if key.endswith("_present"):
            name = key[: -len("_present")]
            if name not in features:
                raise ValueError(f"{path}: '{key}' names no modality; modalities are {sorted(features)}")
            present[name] = torch.from_numpy(np.asarray(arr).astype(bool))
    if not features:
        raise ValueError(f"{path}: no feature arrays beside the labels")
    if present:
        stacked = torch.stack([present.get(m, torch.ones(len(labels), dtype=torch.bool)) for m in features])
        if not stacked.any(0).all():
            bad = int((~stacked.any(0)).nonzero()[0])
            raise ValueError(f"{path}: example {bad} has no modality present; every example needs at least one")
    return MultimodalData(features, torch.from_numpy(labels), names, present)


def _read_parquet(path: Path) -> dict[str, np.ndarray]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or save a .npz") from e
    table = pq.read_table(path)
    out = {}
    for name in table.column_names:
        col = table.column(name).to_pylist()
        first = next((v for v in col if v is not None), None)
        if isinstance(first, (list, tuple)):
            width = len(first)
            rows = [v if v is not None else [0.0] * width for v in col]
            if any(len(r) != width for r in rows):
                raise ValueError(f"{path}: column '{name}' has lists of different lengths; features need one width")
            out[name] = np.asarray(rows, dtype=np.float32)
            if any(v is None for v in col) and f"{name}_present" not in table.column_names:
                out[f"{name}_present"] = np.array([v is not None for v in col])
        else:
            out[name] = np.asarray(col)
    return out
