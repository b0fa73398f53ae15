"""Fusion strategies: shapes, masks, gradients, no NaN, and each strategy's own promise."""

import pytest
import torch

from mmfusion.modules.fusions import (
    FUSIONS,
    AttentionFusion,
    CrossModalAttentionBlock,
    Fusion,
    GatedCrossAttentionBlock,
    GatedCrossAttentionFusion,
    LateFusion,
    LowRankFusion,
    ModalityDropout,
    build_fusion,
)
from tests.utils import one_thread  # noqa: E402, F401  (autouse: one torch thread)

WIDTH = 16
CLASSES = 5
DIMS2 = {"image": 12, "audio": 8}
DIMS3 = {"image": 12, "audio": 8, "text": 16}
# every registered strategy, late fusion once per combine mode
CASES = [(name, {}) for name in FUSIONS if name != "late"] + [("late", {"combine": c}) for c in LateFusion.COMBINES]
IDS = [name + "-" + "-".join(kw.values()) if kw else name for name, kw in CASES]
# parameters that get no gradient when every modality is present: placeholders for missing ones
NO_GRAD_WHEN_ALL_PRESENT = {"concat": ("placeholders.",), "gated": ("placeholder",)}


def make(name: str, dims: dict[str, int], **kw) -> Fusion:
    torch.manual_seed(0)
    if name == "late":
        kw = {"num_classes": CLASSES, **kw}
    return build_fusion(name, dims, WIDTH, **kw).eval()


def inputs(dims: dict[str, int], tokens: bool, B: int = 4, seed: int = 1):
    """Features per modality (pooled, or tokens of a different length each) and padding masks for tokens."""
    g = torch.Generator().manual_seed(seed)
    features, padding = {}, {}
    for i, (m, d) in enumerate(dims.items()):
        if tokens:
            T = 3 + i
            features[m] = torch.randn(B, T, d, generator=g)
            pad = torch.zeros(B, T, dtype=torch.bool)
            pad[0, -2:] = True  # some padding at the end of example 0
            pad[2, -1] = True
            padding[m] = pad
        else:
            features[m] = torch.randn(B, d, generator=g)
    return features, (padding or None)


def open_gates(fusion: Fusion) -> None:
    """Gated blocks start closed; open them so that the context can reach the output."""
    with torch.no_grad():
        for module in fusion.modules():
            if isinstance(module, GatedCrossAttentionBlock):
                module.attn_gate.fill_(0.5)
                module.ff_gate.fill_(0.5)


@pytest.mark.parametrize("tokens", [False, True], ids=["pooled", "tokens"])
@pytest.mark.parametrize("dims", [DIMS2, DIMS3], ids=["2mod", "3mod"])
@pytest.mark.parametrize(("name", "kw"), CASES, ids=IDS)
def test_output_shape_and_finite(name, kw, dims, tokens):
    fusion = make(name, dims, **kw)
    features, padding = inputs(dims, tokens)
    out = fusion(features, padding=padding)
    expected = CLASSES if name == "late" else WIDTH
    assert fusion.out_dim == expected
    assert out.shape == (4, expected)
    assert torch.isfinite(out).all()
    assert fusion.modalities == tuple(dims)
    assert type(fusion).produces_logits == (name == "late")


@pytest.mark.parametrize("tokens", [False, True], ids=["pooled", "tokens"])
@pytest.mark.parametrize(("name", "kw"), CASES, ids=IDS)
def test_absent_modality_features_do_not_matter(name, kw, tokens):
    fusion = make(name, DIMS3, **kw)
    open_gates(fusion)
    features, padding = inputs(DIMS3, tokens)
    present = {"audio": torch.tensor([True, False, True, False]), "image": torch.tensor([False, True, True, True])}
    out = fusion(features, present, padding)
    changed = dict(features)
    changed["audio"] = features["audio"].clone()
    changed["audio"][[1, 3]] = torch.randn_like(changed["audio"][[1, 3]]) * 100
    changed["image"] = features["image"].clone()
    changed["image"][0] = float("nan")  # not even a NaN under the mask may leak
    torch.testing.assert_close(fusion(changed, present, padding), out)


@pytest.mark.parametrize(("name", "kw"), CASES, ids=IDS)
def test_padding_tokens_do_not_matter(name, kw):
    fusion = make(name, DIMS3, **kw)
    open_gates(fusion)
    features, padding = inputs(DIMS3, tokens=True)
    out = fusion(features, padding=padding)
    changed = {m: x.masked_fill(padding[m].unsqueeze(-1), float("nan")) for m, x in features.items()}
    torch.testing.assert_close(fusion(changed, padding=padding), out)
    # and the padding is honoured: the same tokens without it give another output
    assert not torch.allclose(fusion(features), out)


@pytest.mark.parametrize(("name", "kw"), CASES, ids=IDS)
def test_padding_equals_each_example_without_it(name, kw):
    fusion = make(name, DIMS3, **kw)
    open_gates(fusion)
    features, padding = inputs(DIMS3, tokens=True)
    out = fusion(features, padding=padding)
    for b in range(4):
        alone = fusion({m: x[b : b + 1, ~padding[m][b]] for m, x in features.items()})
        torch.testing.assert_close(out[b : b + 1], alone)


def restricted(fusion: Fusion, name: str, kw: dict, keep: list[str]) -> Fusion:
    """The same strategy built for the modalities ``keep`` only, with the weights of ``fusion``."""
    sub = make(name, {m: fusion.dims[m] for m in keep}, **kw)
    names = getattr(fusion, "context_modalities", fusion.modalities)
    sub_names = getattr(sub, "context_modalities", sub.modalities)
    state = fusion.state_dict()
    index = [names.index(m) for m in sub_names]
    rows = {k: state[k][index] for k in ("modality_embed", "modality_logits") if k in state}
    sub.load_state_dict({k: rows.get(k, state[k]) for k in sub.state_dict()})
    return sub


MASKING = [(case, i) for case, i in zip(CASES, IDS) if case[0] not in ("concat", "lowrank")]


@pytest.mark.parametrize(("name", "kw"), [c for c, _ in MASKING], ids=[i for _, i in MASKING])
def test_masked_modality_is_as_if_the_fusion_never_had_it(name, kw):
    fusion = make(name, DIMS3, **kw)
    open_gates(fusion)
    features, padding = inputs(DIMS3, tokens=True)
    present = {"audio": torch.tensor([True, False, True, False])}
    out = fusion(features, present, padding)
    keep = ["image", "text"]
    sub = restricted(fusion, name, kw, keep)
    expected = sub({m: features[m] for m in keep}, padding={m: padding[m] for m in keep})
    torch.testing.assert_close(out[[1, 3]], expected[[1, 3]])


def test_concat_fills_a_missing_modality_with_its_placeholder():
    fusion = make("concat", DIMS2)
    features, _ = inputs(DIMS2, tokens=False)
    present = {"audio": torch.tensor([True, False, True, False])}
    filled = {**features, "audio": features["audio"].clone()}
    filled["audio"][[1, 3]] = fusion.placeholders["audio"].detach()
    torch.testing.assert_close(fusion(features, present), fusion(filled))


@pytest.mark.parametrize(("name", "kw"), CASES, ids=IDS)
def test_left_out_modality_is_absent_for_every_example(name, kw):
    fusion = make(name, DIMS3, **kw)
    open_gates(fusion)
    features, _ = inputs(DIMS3, tokens=False)
    absent = {"text": torch.zeros(4, dtype=torch.bool)}
    without = {m: x for m, x in features.items() if m != "text"}
    torch.testing.assert_close(fusion(without), fusion(features, absent))


@pytest.mark.parametrize("tokens", [False, True], ids=["pooled", "tokens"])
@pytest.mark.parametrize(("name", "kw"), CASES, ids=IDS)
def test_gradients_reach_every_input_and_parameter(name, kw, tokens):
    fusion = make(name, DIMS3, **kw).train()
    open_gates(fusion)
    features, padding = inputs(DIMS3, tokens)
    features = {m: x.requires_grad_() for m, x in features.items()}
    out = fusion(features, padding=padding)
    (out * torch.randn_like(out)).sum().backward()  # a random direction: sum() alone is blind after a LayerNorm
    for m, x in features.items():
        assert x.grad is not None and x.grad.abs().sum() > 0, m
        if tokens:
            assert (x.grad[padding[m]] == 0).all(), f"padding of {m} got a gradient"
    skip = NO_GRAD_WHEN_ALL_PRESENT.get(name, ())
    for pname, p in fusion.named_parameters():
        if pname.startswith(skip):
            assert p.grad is None or (p.grad == 0).all(), pname
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize(("name", "kw"), CASES, ids=IDS)
def test_no_nan_when_every_token_or_context_is_masked(name, kw):
    fusion = make(name, DIMS3, **kw).train()
    open_gates(fusion)
    features, padding = inputs(DIMS3, tokens=True)
    features = {m: x.requires_grad_() for m, x in features.items()}
    padding["image"][0] = True  # example 0: image present but all padding
    padding["audio"][1] = True  # example 1: only image has real tokens (empty context for it)
    padding["text"][1] = True
    present = {"audio": torch.tensor([True, False, True, True]), "text": torch.tensor([False, True, False, True])}
    out = fusion(features, present, padding)
    assert torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    for m, x in features.items():
        assert torch.isfinite(x.grad).all(), m
    for pname, p in fusion.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), pname


def test_every_example_needs_a_present_modality():
    fusion = make("unified", DIMS2)
    features, _ = inputs(DIMS2, tokens=False)
    present = {"image": torch.tensor([True, False, True, True]), "audio": torch.tensor([True, False, False, True])}
    with pytest.raises(ValueError, match=r"at least one present modality.*\[1\]"):
        fusion(features, present)


def test_unknown_modality_and_bad_shapes_are_errors():
    fusion = make("concat", DIMS2)
    features, _ = inputs(DIMS2, tokens=False)
    with pytest.raises(ValueError, match="unknown modalities"):
        fusion({**features, "depth": torch.randn(4, 3)})
    with pytest.raises(ValueError, match=r"\(B, 8\) or \(B, T, 8\)"):
        fusion({**features, "audio": torch.randn(4, 9)})


def test_unknown_strategy_lists_the_names():
    with pytest.raises(ValueError, match="unknown fusion strategy 'nope'.*concat.*lowrank"):
        build_fusion("nope", DIMS2, WIDTH)


def test_registry_holds_fusions():
    assert set(FUSIONS) == {"concat", "late", "attention", "cross_attention", "gated", "unified", "lowrank"}
    assert all(issubclass(cls, Fusion) for cls in FUSIONS.values())


# ---- cross-attention blocks ----


def test_cross_attention_block_with_padding_equals_each_example_unpadded():
    torch.manual_seed(0)
    block = CrossModalAttentionBlock(16, heads=4, mlp_ratio=2.0, context_dim=8).eval()
    x, context = torch.randn(3, 5, 16), torch.randn(3, 6, 8)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[0, 4:] = True
    pad[2, 1:] = True
    out = block(x, context, pad)
    for b in range(3):
        alone = block(x[b : b + 1], context[b : b + 1, ~pad[b]])
        torch.testing.assert_close(out[b : b + 1], alone)


def test_cross_attention_block_keeps_rows_without_context():
    torch.manual_seed(0)
    block = CrossModalAttentionBlock(16, heads=4)
    x = torch.randn(3, 5, 16, requires_grad=True)
    context = torch.randn(3, 6, 16)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1] = True
    out = block(x, context, pad)
    assert torch.equal(out[1], x[1])
    assert not torch.allclose(out[0], x[0])
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(block(x, context[:, :0]), x)  # an empty context too


def test_gated_block_is_the_identity_at_init_only():
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(12, heads=4, context_dim=16)
    x, context = torch.randn(2, 5, 12), torch.randn(2, 7, 16)
    assert torch.equal(block(x, context), x)
    with torch.no_grad():
        block.attn_gate.fill_(0.3)
    assert not torch.allclose(block(x, context), x)
    with torch.no_grad():
        block.attn_gate.zero_()
        block.ff_gate.fill_(0.3)
    assert not torch.allclose(block(x, context), x)


def test_gated_fusion_at_init_reads_only_the_primary():
    torch.manual_seed(0)
    fusion = GatedCrossAttentionFusion(DIMS3, WIDTH, primary="audio", heads=4)
    features, padding = inputs(DIMS3, tokens=True)
    out = fusion(features, padding=padding)
    primary_mean = torch.stack([features["audio"][b][~padding["audio"][b]].mean(0) for b in range(4)])
    torch.testing.assert_close(out, fusion.head(primary_mean))
    other = {**features, "image": torch.randn_like(features["image"])}
    torch.testing.assert_close(fusion(other, padding=padding), out)
    open_gates(fusion)
    assert not torch.allclose(fusion(other, padding=padding), fusion(features, padding=padding))


def test_gated_fusion_missing_primary_uses_the_placeholder():
    fusion = make("gated", DIMS2)
    open_gates(fusion)
    features, _ = inputs(DIMS2, tokens=False)
    absent = {"image": torch.zeros(4, dtype=torch.bool)}
    out = fusion(features, absent)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(fusion({"audio": features["audio"]}), out)
    # the placeholder attends to the audio, so the audio matters
    assert not torch.allclose(fusion({"audio": features["audio"] + 1}), out)


# ---- strategies' own promises ----


def test_late_fusion_combine_modes():
    features, _ = inputs(DIMS3, tokens=False)
    present = {"audio": torch.tensor([True, False, True, True]), "text": torch.tensor([True, True, False, True])}
    mask = torch.stack([torch.ones(4, dtype=torch.bool), present["audio"], present["text"]], 1)  # (B, M)
    for combine in LateFusion.COMBINES:
        fusion = make("late", DIMS3, combine=combine)
        per = fusion.per_modality_logits(features, present)
        assert set(per) == set(DIMS3) and all(v.shape == (4, CLASSES) for v in per.values())
        logits = torch.stack([per[m] for m in DIMS3], 1)  # (B, M, C)
        out = fusion(features, present)
        if combine == "poe":
            expected = (logits.log_softmax(-1) * mask[..., None]).sum(1)
        elif combine == "mean":
            expected = (logits * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        else:
            with torch.no_grad():
                fusion.modality_logits.copy_(torch.tensor([0.5, -1.0, 2.0]))
            out = fusion(features, present)
            w = torch.tensor([0.5, -1.0, 2.0]).exp() * mask  # (B, M), renormalised over present ones
            expected = ((w / w.sum(1, keepdim=True))[..., None] * logits).sum(1)
        torch.testing.assert_close(out, expected)
    # poe: the product of the experts' distributions, normalised
    fusion = make("late", DIMS2, combine="poe")
    two = {m: features[m] for m in DIMS2}
    per = fusion.per_modality_logits(two)
    product = per["image"].softmax(-1) * per["audio"].softmax(-1)
    torch.testing.assert_close(fusion(two).softmax(-1), product / product.sum(-1, keepdim=True))


def test_attention_weights_sum_to_one_over_present_modalities():
    fusion = make("attention", DIMS3)
    features, padding = inputs(DIMS3, tokens=True)
    present = {"audio": torch.tensor([True, False, True, False]), "text": torch.tensor([False, False, True, True])}
    fusion(features, present, padding)
    w = fusion.last_weights
    assert isinstance(fusion, AttentionFusion) and w.shape == (4, 3)
    torch.testing.assert_close(w.sum(1), torch.ones(4))
    assert (w[1] == torch.tensor([1.0, 0.0, 0.0])).all()
    assert (w[0, 2] == 0) and (w[3, 1] == 0) and (w[2] > 0).all()


def test_lowrank_matches_the_formula_with_an_appended_one():
    torch.manual_seed(0)
    fusion = LowRankFusion(DIMS2, WIDTH, rank=3)
    features, _ = inputs(DIMS2, tokens=False)
    present = {"audio": torch.tensor([True, False, True, False])}

    def reference(z: dict[str, torch.Tensor]) -> torch.Tensor:
        prod = 1.0
        for m, x in z.items():
            x1 = torch.cat([x, torch.ones(len(x), 1)], dim=1)  # (B, D + 1)
            prod = prod * torch.einsum("bd,rdw->brw", x1, fusion.factors[m])
        return fusion.norm(prod.sum(1) + fusion.bias)

    torch.testing.assert_close(fusion(features), reference(features))
    zeroed = {**features, "audio": features["audio"] * present["audio"][:, None]}
    torch.testing.assert_close(fusion(features, present), reference(zeroed))


# ---- modality dropout ----


def test_modality_dropout_never_drops_everything():
    torch.manual_seed(0)
    features, _ = inputs(DIMS3, tokens=False, B=2000)
    given = {"text": torch.rand(2000) < 0.5}
    for p in (0.5, 0.9, 1.0):
        drop = ModalityDropout(p).train()
        out = drop(features, given)
        keep = torch.stack([out[m] for m in DIMS3], 1)  # (B, M)
        assert keep.any(1).all()
        assert not (keep[:, 2] & ~given["text"]).any()  # never brings back a modality an example lacks
        if p == 1.0:
            assert (keep.sum(1) == 1).all()
    kept = torch.stack(list(ModalityDropout(0.5).train()(features).values()), 1).float().mean()
    assert 0.45 < kept < 0.62  # about 1 - p, a little more for the examples given one back


def test_modality_dropout_is_the_identity_in_eval():
    features, _ = inputs(DIMS2, tokens=False)
    given = {"audio": torch.tensor([True, False, True, False])}
    out = ModalityDropout(0.9).eval()(features, given)
    assert torch.equal(out["audio"], given["audio"]) and out["image"].all()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ModalityDropout(1.5)
    with pytest.raises(ValueError, match="at least one present modality"):
        ModalityDropout(0.1)({"image": features["image"]}, {"image": torch.zeros(4, dtype=torch.bool)})
