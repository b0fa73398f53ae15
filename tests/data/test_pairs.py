import numpy as np
import pytest

from mmfusion.data.pairs import Pair, PairSampler, ShapesPairs, matches, unique_ids
from mmfusion.data.shapes import Obj, Scene, ShapesWorld


class _Finite:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def pair(self, index, rng, k=1, first=False):
        return Pair(np.full((2, 2, 3), index, np.uint8), [f"caption {index} {rng.integers(1000)}"] * k)


def test_each_epoch_is_a_permutation_and_positions_are_pure():
    s = PairSampler(_Finite(10), seed=3)
    epoch0 = [s.index(p)[1] for p in range(10)]
    epoch1 = [s.index(p)[1] for p in range(10, 20)]
    assert sorted(epoch0) == list(range(10)) and sorted(epoch1) == list(range(10)) and epoch0 != epoch1
    again = PairSampler(_Finite(10), seed=3)
    assert [again.sample(p).caption for p in (17, 2, 17)] == [
        s.sample(17).caption,
        s.sample(2).caption,
        s.sample(17).caption,
    ]


def test_stream_position_is_scene_index():
    world = ShapesWorld()
    s = PairSampler(ShapesPairs(world, 32), seed=0)
    p = s.sample(42)
    assert p.image.shape == (32, 32, 3) and p.scene == world.scene("train", 42)
    assert p.caption in [c.text for c in world.captions(p.scene)]
    batch = s.batch(40, 4)
    assert len(batch) == 4 and batch[2].caption == p.caption


def _pair(caption, objs, meaning_objs, count=None):
    scene = Scene(tuple(Obj(*o) for o in objs), 40)
    meaning = {"objects": [dict(zip(("shape", "colour"), m)) for m in meaning_objs], "relations": [], "count": count}
    return Pair(np.zeros((2, 2, 3), np.uint8), [caption], scene, [meaning])


def test_positive_modes():
    red_small = _pair("a red circle", [("circle", "red", "small", 0.5, 0.5)], [("circle", "red")])
    red_large = _pair("a picture of a red circle", [("circle", "red", "large", 0.5, 0.5)], [("circle", "red")])
    red_and_blue = _pair(
        "a red circle and a blue star",
        [("circle", "red", "small", 0.2, 0.5), ("star", "blue", "small", 0.8, 0.5)],
        [("circle", "red"), ("star", "blue")],
    )
    same_text = _pair("A red circle", [("circle", "red", "large", 0.3, 0.3)], [("circle", "red")])
    batch = [red_small, red_large, red_and_blue, same_text]
    assert matches(batch, "pair") is None
    assert matches(batch, "caption").astype(int).tolist() == [[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1]]
    # "a red circle" describes both single red circles, but not the scene that also has a blue star
    assert matches(batch, "meaning").astype(int).tolist() == [[1, 1, 0, 1], [1, 1, 0, 1], [0, 0, 1, 0], [1, 1, 0, 1]]
    no_meaning = [Pair(p.image, p.captions) for p in batch]
    assert (matches(no_meaning, "meaning") == matches(batch, "caption")).all()
    with pytest.raises(ValueError, match="positives"):
        matches(batch, "soft")


def test_a_curriculum_export_is_read_in_stream_order_first(tmp_path):
    from mmfusion.data.datasets import CaptionFolder
    from mmfusion.data.export import export_shapes
    from mmfusion.data.pairs import FolderPairs
    from mmfusion.data.shapes import ShapesConfig

    world = ShapesWorld(ShapesConfig(curriculum=6))
    export_shapes(world, tmp_path, {"train": 20}, zeroshot_per_class=0, progress=False)
    source = FolderPairs(CaptionFolder(tmp_path / "train", 64), 64)
    assert source.ordered_stream
    folder = PairSampler(source, seed=1, first_epoch_in_order=True)
    stream = PairSampler(ShapesPairs(world, 64), seed=1)
    for p in (0, 7, 19):
        a, b = folder.sample(p), stream.sample(p)
        assert a.caption == b.caption and a.scene == b.scene and np.array_equal(a.image, b.image)
    second_epoch = [folder.index(p)[1] for p in range(20, 40)]
    assert sorted(second_epoch) == list(range(20)) and second_epoch != list(range(20))


def test_several_captions_per_image():
    world = ShapesWorld()
    s = PairSampler(ShapesPairs(world, 32), seed=0, captions_per_image=3)
    batch = s.batch(0, 4)
    assert all(len(p.captions) == 3 and len(set(p.captions)) == 3 for p in batch)
    own = matches(batch, "pair")
    assert own.shape == (4, 12) and own.sum() == 12 and own[1, 3:6].all()
    assert (matches(batch, "meaning") >= own).all() and (matches(batch, "caption") >= own).all()


def test_hard_negatives_join_the_batch_as_unmatched_columns():
    world = ShapesWorld()
    s = PairSampler(ShapesPairs(world, 32), seed=0, captions_per_image=1, hard_negatives=2)
    batch = s.batch(0, 6)
    assert all(len(p.negatives) == 2 and len(p.texts) == 3 for p in batch)
    m = matches(batch, "meaning")
    assert m.shape == (6, 18)
    for i in range(6):
        assert m[i, 3 * i] and not m[i, 3 * i + 1] and not m[i, 3 * i + 2]  # own caption yes, own negatives no


class _Words(_Finite):
    def pair(self, index, rng, k=1, first=False):
        return Pair(np.full((2, 2, 3), index, np.uint8), ["a red cat left of a blue dog", "a photo"][index % 2 :][:1])


def test_free_text_gets_word_swap_negatives_and_a_true_filler_when_none_exists():
    """A folder's captions (no scene): negatives are word swaps, unmatched by the positives mask; a caption no swap
    changes fills its slot with itself, which the mask then counts as a match (never a false negative)."""
    s = PairSampler(_Words(2), seed=0, hard_negatives=1)
    samples = [s.sample(0), s.sample(1)]
    swapped = next(p for p in samples if "cat" in p.captions[0])
    plain = next(p for p in samples if p is not swapped)
    assert swapped.negatives[0] != swapped.captions[0] and sorted(swapped.negatives[0].split()) != []
    assert swapped.negative_meanings == [None] and [c.text for c in swapped.negative_sources] == swapped.captions
    assert plain.negatives == plain.captions  # nothing to swap in "a photo"
    m = matches([swapped, plain], "meaning")
    assert m.tolist() == [[True, False, False, False], [False, False, True, True]]


def test_unique_ids_ignore_case_and_spaces():
    assert list(unique_ids(["A red circle", "a red circle ", "a blue star", "a red circle"])) == [0, 0, 1, 0]


def test_first_caption_leads_when_asked():
    from mmfusion.data.pairs import ShapesPairs
    from mmfusion.data.shapes import ShapesWorld

    world = ShapesWorld()
    src = ShapesPairs(world, 16)
    first = PairSampler(src, seed=0, first_caption=True)
    for pos in range(20):
        full = world.captions(world.scene("train", pos))[0].text
        assert first.sample(pos).texts[0] == full
    drawn = {PairSampler(src, seed=0).sample(p).texts[0] for p in range(20)}
    assert drawn - {world.captions(world.scene("train", p))[0].text for p in range(20)}  # random picks differ


def test_negatives_edit_any_of_the_images_captions_so_swaps_come_often():
    """One caption drawn per image, but its negatives may edit any caption of the scene: the binding and relation
    swaps (same words, other order) that only multi-object captions allow show up, and every negative is false."""
    from mmfusion.data.shapes import ShapesConfig, satisfies

    world = ShapesWorld(ShapesConfig(curriculum=0))
    s = PairSampler(ShapesPairs(world, 16), seed=0, hard_negatives=1)
    swaps = 0
    for pos in range(200):
        p = s.sample(pos)
        neg, meaning = p.negatives[0], p.negative_meanings[0]
        assert neg not in {c.text for c in p.all_captions} and not satisfies(p.scene, meaning)
        swaps += any(sorted(neg.split()) == sorted(c.text.split()) for c in p.all_captions)
        source = p.negative_sources[0]  # what a likelihood ranks the negative against: the caption it edits
        assert source in p.all_captions and satisfies(p.scene, source.meaning)
        a, b = source.text.split(), neg.split()
        assert sorted(a) == sorted(b) or (abs(len(a) - len(b)) <= 1 and sum(x != y for x, y in zip(a, b)) <= 3)
    assert swaps >= 30
