"""Video encoders: batched divided attention is the loop reference, frame pooling ignores order, FLOPs add up."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmfusion.modules.video import (
    DividedSpaceTimeBlock,
    FramePooling,
    VideoEncoderConfig,
    VideoTransformer,
    build_video_encoder,
    count_flops,
)

TINY = {"frames": 4, "image_size": 16, "patch_size": 4, "width": 32, "layers": 2, "heads": 4}


def _clips(b: int = 3, cfg: VideoEncoderConfig | None = None) -> torch.Tensor:
    cfg = cfg or VideoEncoderConfig(**TINY)
    return torch.randn(b, cfg.frames, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("frames,patches", [(4, 16), (8, 9), (1, 4)])
def test_divided_block_equals_the_loop_reference(frames, patches):
    torch.manual_seed(0)
    block = DividedSpaceTimeBlock(32, 4)
    x = torch.randn(2, 1 + frames * patches, 32, requires_grad=True)
    fast, slow = block(x, frames), block.forward_reference(x, frames)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    g_fast = torch.autograd.grad(fast.square().sum(), [x, *block.parameters()])
    g_slow = torch.autograd.grad(slow.square().sum(), [x, *block.parameters()])
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_divided_encoder_equals_the_loop_reference():
    torch.manual_seed(0)
    enc = VideoTransformer(VideoEncoderConfig(attention="divided", **TINY)).eval()
    clips = _clips()
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features(clips), enc.forward_features(clips, reference=True))


def test_time_attention_mixes_only_one_patch_position():
    """Time attention alone: the token of patch n in frame t depends on patch n in every frame, and on no other."""
    torch.manual_seed(0)
    block = DividedSpaceTimeBlock(8, 2)
    T, N = 3, 4
    x = torch.randn(1, T * N, 8)  # patches only, as time attention sees them
    h = x.reshape(1, T, N, 8).transpose(1, 2).reshape(N, T, 8)  # (B*N, T, D)
    jac = torch.autograd.functional.jacobian(lambda h: block.time_attn(block.ln_time(h)), h)  # (N, T, D, N, T, D)
    influence = jac.abs().sum(dim=(2, 5))  # (N, T, N, T)
    same = torch.eye(N, dtype=torch.bool)[:, None, :, None].expand(N, T, N, T)
    assert (influence[~same] == 0).all() and (influence[same] > 0).all()


@pytest.mark.parametrize("attention", ["divided", "joint", "pool"])
def test_encoders_give_one_vector_per_clip_and_learn(attention):
    torch.manual_seed(0)
    cfg = VideoEncoderConfig(attention=attention, **TINY)
    enc = build_video_encoder(cfg)
    clips = _clips(cfg=cfg)
    out = enc(clips)
    assert out.shape == (3, 32) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in enc.parameters() if p.requires_grad)


def test_clips_of_the_wrong_length_are_refused_with_the_shape_expected():
    enc = VideoTransformer(VideoEncoderConfig(**TINY))
    with pytest.raises(ValueError, match=r"expected clips of shape \(B, 4, 3, 16, 16\)"):
        enc(_clips()[:, :2])
    with pytest.raises(ValueError, match="unknown video attention"):
        build_video_encoder(VideoEncoderConfig(attention="sparse", **TINY))


def test_frame_pooling_ignores_frame_order_and_the_others_do_not():
    torch.manual_seed(0)
    clips = _clips()
    backwards = clips.flip(1)
    pool = FramePooling(VideoEncoderConfig(attention="pool", **TINY)).eval()
    with torch.no_grad():
        torch.testing.assert_close(pool(clips), pool(backwards), atol=1e-5, rtol=1e-5)
        for attention in ("divided", "joint"):
            enc = build_video_encoder(VideoEncoderConfig(attention=attention, **TINY)).eval()
            assert (enc(clips) - enc(backwards)).abs().max() > 1e-3


@pytest.mark.parametrize("attention", ["divided", "joint"])
@pytest.mark.parametrize("image_size", [16, 32])
def test_count_flops_matches_torch_flop_counter(attention, image_size):
    """The analytic count equals what torch counts for the blocks (attention run as plain matmuls)."""
    cfg = VideoEncoderConfig(attention=attention, **{**TINY, "image_size": image_size})
    enc = build_video_encoder(cfg).eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        enc(_clips(1, cfg))
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    assert counter.get_total_flops() - counts["aten.convolution"] == sum(count_flops(cfg).values())


def test_divided_attention_pays_off_on_longer_or_larger_clips():
    """At ViT-B size the two cost about the same for 8 frames of 224 px (as in the paper's Table 1); joint
    attention's quadratic term takes over with more frames or pixels."""

    def total(attention: str, frames: int, image_size: int) -> int:
        cfg = VideoEncoderConfig(attention=attention, frames=frames, image_size=image_size, patch_size=16,
                                 width=768, layers=12, heads=12, mlp_ratio=4.0)  # fmt: skip
        return sum(count_flops(cfg).values())

    assert 0.9 < total("joint", 8, 224) / total("divided", 8, 224) < 1.1
    assert total("joint", 8, 448) > 1.5 * total("divided", 8, 448)
    assert total("joint", 32, 224) > 1.5 * total("divided", 32, 224)
    assert total("joint", 96, 224) > 3 * total("divided", 96, 224)
