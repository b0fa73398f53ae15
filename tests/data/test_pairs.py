import numpy as np

from mmfusion.data.pairs import PairSampler, ShapesPairs, unique_ids
from mmfusion.data.shapes import ShapesWorld


class _Finite:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def pair(self, index, rng):
        return np.full((2, 2, 3), index, np.uint8), f"caption {index} {rng.integers(1000)}"


def test_each_epoch_is_a_permutation_and_positions_are_pure():
    s = PairSampler(_Finite(10), seed=3)
    epoch0 = [s.index(p)[1] for p in range(10)]
    epoch1 = [s.index(p)[1] for p in range(10, 20)]
    assert sorted(epoch0) == list(range(10)) and sorted(epoch1) == list(range(10)) and epoch0 != epoch1
    again = PairSampler(_Finite(10), seed=3)
    assert [again.sample(p)[1] for p in (17, 2, 17)] == [s.sample(17)[1], s.sample(2)[1], s.sample(17)[1]]


def test_stream_position_is_scene_index():
    world = ShapesWorld()
    s = PairSampler(ShapesPairs(world, 32), seed=0)
    img, caption = s.sample(42)
    assert img.shape == (32, 32, 3)
    assert caption in [c.text for c in world.captions(world.scene("train", 42))]
    images, captions = s.batch(40, 4)
    assert images.shape == (4, 32, 32, 3) and captions[2] == caption


def test_unique_ids_ignore_case_and_spaces():
    assert list(unique_ids(["A red circle", "a red circle ", "a blue star", "a red circle"])) == [0, 0, 1, 0]
