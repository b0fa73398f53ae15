import numpy as np
import pytest

from mmfusion.data.shapes import (
    COLOURS,
    SHAPES,
    Obj,
    Scene,
    ShapesConfig,
    ShapesWorld,
    make_captions,
    make_questions,
    satisfies,
    why_false,
)


@pytest.fixture(scope="module")
def world():
    return ShapesWorld()


def test_world_has_enough_shapes_colours_and_sizes(world):
    assert len(SHAPES) >= 6 and len(COLOURS) >= 8
    assert len(world.combos("all")) == len(SHAPES) * len(COLOURS)
    assert set(world.combos("seen")).isdisjoint(world.combos("heldout"))


def test_scenes_are_deterministic_per_seed_and_split(world):
    assert world.scene("train", 5) == ShapesWorld().scene("train", 5)
    assert world.scene("train", 5) != world.scene("test", 5)
    assert world.scene("train", 5) != ShapesWorld(ShapesConfig(seed=1)).scene("train", 5)
    a, b = world.sample("train", 3), ShapesWorld().sample("train", 3)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert [c.text for c in a.captions] == [c.text for c in b.captions]


def test_heldout_combinations_never_in_training_and_always_in_heldout(world):
    held = set(world.cfg.heldout)
    for i in range(500):
        assert not any(o.name in held for o in world.scene("train", i).objects)
        assert any(o.name in held for o in world.scene("heldout", i).objects)


def test_objects_inside_the_frame_and_not_overlapping(world):
    counts = set()
    for i in range(500):
        objs = world.scene("test", i).objects
        counts.add(len(objs))
        for o in objs:
            assert o.radius <= o.x <= 1 - o.radius and o.radius <= o.y <= 1 - o.radius
        for a in objs:
            for b in objs:
                if a is not b:
                    assert np.hypot(a.x - b.x, a.y - b.y) > a.radius + b.radius
    assert counts == {1, 2, 3}


def test_every_caption_is_true_of_its_scene_and_mentions_attributes(world):
    for i in range(300):
        s = world.sample("test", i)
        assert len(s.captions) >= 3
        for c in s.captions:
            assert satisfies(s.scene, c.meaning), (c.text, s.scene)
        assert all(o.colour in s.captions[0].text and o.shape in s.captions[0].text for o in s.scene.objects)


def test_captions_use_spatial_relations(world):
    texts = [c.text for i in range(300) for c in world.captions(world.scene("test", i))]
    for word in ("left", "right", "above", "below"):
        assert any(word in t for t in texts), word


def _scene(*objs):
    return Scene(tuple(Obj(*o) for o in objs), 40)


def test_satisfies_hand_checked():
    s = _scene(("circle", "red", "small", 0.2, 0.5), ("square", "blue", "large", 0.8, 0.5))
    red_left_of_blue = {
        "objects": [{"shape": "circle", "colour": "red"}, {"shape": "square", "colour": "blue"}],
        "relations": [[0, "left_of", 1]],
        "count": None,
    }
    assert satisfies(s, red_left_of_blue)
    red_left_of_blue["relations"] = [[0, "right_of", 1]]
    assert not satisfies(s, red_left_of_blue)
    assert satisfies(s, {"objects": [{"shape": "circle", "colour": None}], "relations": [], "count": 2})
    assert not satisfies(s, {"objects": [{"shape": "circle"}], "relations": [], "count": 1})
    assert not satisfies(s, {"objects": [{"shape": "circle", "colour": "blue"}], "relations": [], "count": None})
    # one object cannot stand for two references
    assert not satisfies(s, {"objects": [{"shape": "circle"}, {"shape": "circle"}], "relations": [], "count": None})
    assert satisfies(s, {"objects": [{"shape": "circle", "region": "left"}], "relations": [], "count": None})
    assert not satisfies(s, {"objects": [{"shape": "circle", "region": "right"}], "relations": [], "count": None})


def test_why_false_names_what_the_scene_gets_wrong():
    s = _scene(("circle", "red", "small", 0.2, 0.5), ("square", "blue", "large", 0.8, 0.5))

    def ref(shape, colour, **kw):
        return {"shape": shape, "colour": colour, "size": None, **kw}

    def why(*refs, relations=(), count=None):
        return why_false(s, {"objects": list(refs), "relations": list(relations), "count": count})

    assert why(ref("circle", "red"), ref("square", "blue")) is None
    assert why(ref("star", "red")) == "shape missing"
    assert why(ref("star", "green")) == "shape missing"  # shape is checked first
    assert why(ref("circle", "green")) == "colour missing"
    assert why({"shape": "circle", "colour": None, "size": "large"}) == "binding"  # the square is the large one
    small = _scene(("circle", "red", "small", 0.2, 0.5), ("square", "blue", "small", 0.8, 0.5))
    assert why_false(small, {"objects": [ref("circle", None, size="large")], "relations": [], "count": None}) == (
        "size missing"
    )
    assert why(ref("circle", "blue"), ref("square", "red")) == "binding"  # both colours, both shapes, swapped
    assert why(ref("circle", "red"), ref("circle", "red")) == "binding"  # one object cannot be two
    assert why(ref("circle", "red"), count=3) == "count"
    assert why(ref("circle", "red"), ref("square", "blue"), relations=[[0, "right_of", 1]]) == "relation"
    assert why(ref("circle", "red", region="right")) == "region"
    assert why(ref("circle", "red", region="left")) is None


def test_questions_have_the_right_answers():
    s = _scene(("circle", "red", "small", 0.2, 0.5), ("square", "blue", "large", 0.8, 0.5))
    qas = make_questions(s, np.random.default_rng(0))
    by_q = {q.question: q.answer for q in qas}
    assert {q.type for q in qas} >= {"size", "count", "exist", "relation"}
    if "what colour is the circle?" in by_q:
        assert by_q["what colour is the circle?"] == "red"
    if "what shape is the blue object?" in by_q:
        assert by_q["what shape is the blue object?"] == "square"
    relation = [q for q in qas if q.type == "relation"]
    for q in relation:
        assert (q.question, q.answer) in {
            ("what is to the left of the square?", "red circle"),
            ("what is to the right of the circle?", "blue square"),
        }
    for q in qas:
        if q.question == "how many objects are there?":
            assert q.answer == "2"


def test_question_types_cover_the_issue(world):
    types = {q.type for i in range(200) for q in world.questions(world.scene("test", i))}
    assert types == {"colour", "shape", "count", "exist", "relation", "size"}


def test_render_size_and_colours(world):
    s = _scene(("square", "red", "large", 0.5, 0.5))
    img = np.asarray(world.render(s, 64))
    assert img.shape == (64, 64, 3)
    assert tuple(img[32, 32]) == COLOURS["red"]
    assert tuple(img[1, 1]) == (40, 40, 40)
    assert world.render(s, 32).size == (32, 32)


def test_classification_set_is_single_objects_of_the_class(world):
    items = world.classification_set("heldout", 3)
    assert len(items) == 3 * len(world.cfg.heldout)
    for scene, label in items:
        assert len(scene.objects) == 1 and scene.objects[0].name == label


def test_bad_config_is_explained():
    with pytest.raises(ValueError, match="colour shape"):
        ShapesWorld(ShapesConfig(heldout=("triangle red",)))
    with pytest.raises(ValueError, match="unknown split"):
        ShapesWorld().scene("training", 0)


def test_curriculum_holds_single_objects_then_ramps_to_the_mix():
    assert ShapesConfig().curriculum > 0  # on by default for the training split
    world = ShapesWorld(ShapesConfig(curriculum=300))
    counts = [len(world.scene("train", i).objects) for i in range(1200)]
    assert set(counts[:300]) == {1}
    ramp = counts[300:600]
    assert np.mean(ramp[150:]) > 1 and np.mean(ramp[:100]) < np.mean(ramp[200:])
    assert abs(np.mean([c == 1 for c in counts[600:]]) - 0.4) < 0.1  # object_weights afterwards
    assert {len(world.scene("test", i).objects) for i in range(100)} == {1, 2, 3}  # only training is ramped


def test_describes_matrix_equals_the_scalar_definition():
    from mmfusion.data.shapes import describes, describes_matrix

    world = ShapesWorld(ShapesConfig(seed=4))
    scenes = [world.scene("test", i) for i in range(60)] + [world.scene("heldout", i) for i in range(20)]
    meanings = [c.meaning for sc in scenes[:50] for c in world.captions(sc)]
    meanings.append(
        {
            "objects": [{"shape": "circle", "colour": None, "size": None, "region": "top left"}],
            "relations": [],
            "count": None,
        }
    )
    meanings.append({"objects": [{"shape": "hexagon"}], "relations": [], "count": None})
    fast = describes_matrix(scenes, meanings)
    slow = np.array([[describes(sc, m) for m in meanings] for sc in scenes])
    assert fast.shape == slow.shape and (fast == slow).all()
    assert 0 < fast.sum() < fast.size


def test_caption_kinds():
    from mmfusion.data.shapes import caption_kind

    one = {"shape": "circle", "colour": "red"}
    assert caption_kind({"objects": [one], "relations": [], "count": None}) == "single"
    assert caption_kind({"objects": [one], "relations": [], "count": 1}) == "single"
    assert caption_kind({"objects": [{**one, "region": "left"}], "relations": [], "count": None}) == "region"
    assert caption_kind({"objects": [one, one], "relations": [], "count": 2}) == "list"
    assert caption_kind({"objects": [one, one], "relations": [[0, "above", 1]], "count": None}) == "relation"
    assert caption_kind({"objects": [one], "relations": [], "count": 3}) == "count"


def test_training_negatives_are_edits_that_turn_false():
    """What train.hard_negatives adds (data.negatives.hard_negative): false of the scene, never a held-out
    combination, and the binding swap among them."""
    from mmfusion.data.negatives import hard_negative

    world = ShapesWorld(ShapesConfig(curriculum=0))
    rng = np.random.default_rng(0)
    held = set(world.cfg.heldout)
    made = 0
    for i in range(150):
        scene = world.scene("test", i)
        got = hard_negative(scene, world.captions(scene), rng, avoid=held)
        if got is None:
            continue
        cap, neg = got
        made += 1
        assert not satisfies(scene, neg.meaning) and neg.text != cap.text
        assert not any(f"{o.get('colour')} {o.get('shape')}" in held for o in neg.meaning["objects"])
    assert made > 140
    scene = Scene((Obj("circle", "red", "small", 0.2, 0.5), Obj("square", "blue", "small", 0.8, 0.5)), 40)
    caps = [c for c in make_captions(scene, np.random.default_rng(1), 5) if " and " in c.text][:1]
    texts = {hard_negative(scene, caps, np.random.default_rng(s))[1].text for s in range(60)}
    assert any("blue circle" in t and "red square" in t for t in texts)
