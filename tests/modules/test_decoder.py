"""The text decoder: the key-value cache changes nothing but speed; beam search and sampling behave."""

import pytest
import torch

from mmfusion.modules.decoder import DecoderConfig, TextDecoder
from mmfusion.modules.generation import generate

SOT, EOT, PAD = 2, 3, 0


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    dec = TextDecoder(DecoderConfig(vocab_size=50, context_length=24, width=32, layers=2, heads=4), memory_width=24)
    with torch.no_grad():  # livelier logits than the small init gives, so that decoding paths differ
        dec.token_embed.weight.mul_(20)
    return dec.eval()


@pytest.fixture(scope="module")
def memory():
    return torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(1))


def test_cached_steps_give_the_logits_of_the_whole_sequence(decoder, memory):
    tokens = torch.randint(4, 50, (3, 10), generator=torch.Generator().manual_seed(2))
    full = decoder(tokens, memory=memory)
    cache = decoder.start(memory)
    pieces = [decoder(tokens[:, :4], cache=cache)]  # a prefix at once (masked), then one token at a time
    pieces += [decoder(tokens[:, t : t + 1], cache=cache) for t in range(4, 10)]
    assert cache.length == 10
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_position_t_never_sees_later_tokens(decoder, memory):
    a = torch.randint(4, 50, (3, 8), generator=torch.Generator().manual_seed(3))
    b = a.clone()
    b[:, 5:] = torch.randint(4, 50, (3, 3), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(decoder(a, memory=memory)[:, :5], decoder(b, memory=memory)[:, :5])


def test_the_image_changes_the_logits(decoder, memory):
    tokens = torch.full((3, 2), SOT)
    out = decoder(tokens, memory=memory)
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize(
    "options",
    [{}, {"num_beams": 3}, {"num_beams": 4, "length_penalty": 0.0}, {"do_sample": True, "seed": 7, "top_p": 0.9},
     {"repetition_penalty": 1.5}],
)  # fmt: skip
def test_cache_and_no_cache_generate_the_same_tokens(decoder, memory, options):
    kw = {"sot_id": SOT, "eot_id": EOT, "pad_id": PAD, "max_new_tokens": 20, **options}
    assert generate(decoder, memory, use_cache=True, **kw) == generate(decoder, memory, use_cache=False, **kw)


def test_one_beam_is_greedy(decoder, memory):
    kw = {"sot_id": SOT, "eot_id": EOT, "pad_id": PAD, "max_new_tokens": 20}
    greedy = generate(decoder, memory, **kw)
    assert generate(decoder, memory, num_beams=1, **kw) == greedy
    assert all(len(s) > 0 for s in greedy)


def test_greedy_takes_the_argmax_each_step(decoder, memory):
    ids = generate(decoder, memory[:1], sot_id=SOT, eot_id=EOT, pad_id=PAD, max_new_tokens=6)[0]
    seq = [SOT]
    for tok in ids:
        logits = decoder(torch.tensor([seq]), memory=memory[:1])[0, -1]
        assert int(logits.argmax()) == tok
        seq.append(tok)


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy(decoder, memory):
    def logprob(seq, m):
        ids = torch.tensor([[SOT, *seq, EOT]])
        logp = decoder(ids[:, :-1], memory=m).log_softmax(-1)
        return float(logp[0, torch.arange(len(seq) + 1), ids[0, 1:]].sum())

    kw = {"sot_id": SOT, "eot_id": EOT, "pad_id": PAD, "max_new_tokens": 23}
    greedy = generate(decoder, memory, **kw)
    beam = generate(decoder, memory, num_beams=5, length_penalty=0.0, **kw)
    for i in range(3):
        if EOT in [*greedy[i]] or len(greedy[i]) < 23:  # both finished: compare whole-caption likelihoods
            assert logprob(beam[i], memory[i : i + 1]) >= logprob(greedy[i], memory[i : i + 1]) - 1e-4


def test_sampling_repeats_with_a_seed_and_varies_without(decoder, memory):
    kw = {"sot_id": SOT, "eot_id": EOT, "pad_id": PAD, "max_new_tokens": 15, "do_sample": True, "temperature": 1.5}
    state = torch.random.get_rng_state()
    a = generate(decoder, memory, seed=11, **kw)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert generate(decoder, memory, seed=11, **kw) == a
    assert generate(decoder, memory, seed=12, **kw) != a


def test_top_p_keeps_only_the_nucleus(decoder, memory):
    kw = {"sot_id": SOT, "eot_id": EOT, "pad_id": PAD, "max_new_tokens": 1, "do_sample": True, "top_p": 1e-6}
    greedy = generate(decoder, memory, sot_id=SOT, eot_id=EOT, pad_id=PAD, max_new_tokens=1)
    assert all(generate(decoder, memory, seed=s, **kw) == greedy for s in range(5))


def test_bad_combinations_are_refused(decoder, memory):
    with pytest.raises(ValueError, match="beam search and sampling"):
        generate(decoder, memory, sot_id=SOT, eot_id=EOT, pad_id=PAD, num_beams=2, do_sample=True)
    with pytest.raises(ValueError, match="context length"):
        decoder(torch.zeros(1, 30, dtype=torch.long), memory=memory[:1])


@pytest.mark.parametrize("options", [{}, {"num_beams": 3}, {"do_sample": True, "seed": 3}])
def test_a_prompt_is_continued_with_and_without_the_cache(decoder, memory, options):
    kw = {"sot_id": SOT, "eot_id": EOT, "pad_id": PAD, "max_new_tokens": 12, **options}
    prompt = torch.tensor([[SOT, 7, 9, 11]] * 3)
    cached = generate(decoder, memory, prompt=prompt, use_cache=True, **kw)
    assert cached == generate(decoder, memory, prompt=prompt, use_cache=False, **kw)
    # a prompt of <sot> alone is no prompt at all
    assert generate(decoder, memory, prompt=prompt[:, :1], **kw) == generate(decoder, memory, **kw)
    if not options:  # greedy: each token is the argmax after the prompt and what came before
        seq = [SOT, 7, 9, 11]
        for tok in cached[0]:
            assert int(decoder(torch.tensor([seq]), memory=memory[:1])[0, -1].argmax()) == tok
            seq.append(tok)


def test_bad_prompts_are_refused(decoder, memory):
    kw = {"sot_id": SOT, "eot_id": EOT, "pad_id": PAD}
    with pytest.raises(ValueError, match="starting with <sot>"):
        generate(decoder, memory, prompt=torch.tensor([[5, 6]] * 3), **kw)
    with pytest.raises(ValueError, match="starting with <sot>"):
        generate(decoder, memory, prompt=torch.tensor([[SOT, 6]] * 2), **kw)
    with pytest.raises(ValueError, match="no room"):
        generate(decoder, memory, prompt=torch.full((3, 24), SOT), **kw)


def test_memory_positions_start_as_the_decoder_was_and_then_tell_where_a_token_lies():
    torch.manual_seed(0)
    dec = TextDecoder(DecoderConfig(vocab_size=50, context_length=24, width=32, layers=2, heads=4), memory_width=24)
    memory = torch.randn(2, 1 + 9, 24, generator=torch.Generator().manual_seed(2))  # a class token and a 3x3 grid
    tokens = torch.randint(4, 50, (2, 6), generator=torch.Generator().manual_seed(3))
    before = dec(tokens, memory=memory)
    dec.add_memory_positions()
    assert dec.cfg.memory_positions and dec.memory_pos is not None
    assert torch.equal(dec(tokens, memory=memory), before)  # zero-initialised: a trained decoder is unchanged
    with torch.no_grad():
        dec.memory_pos.weight.normal_()
    moved = memory.clone()
    moved[:, [1, 3]] = memory[:, [3, 1]]  # two image tokens trade places
    plain = TextDecoder(DecoderConfig(vocab_size=50, context_length=24, width=32, layers=2, heads=4), 24)
    plain.load_state_dict({k: v for k, v in dec.state_dict().items() if not k.startswith("memory_pos")})
    assert torch.allclose(plain(tokens, memory=moved), plain(tokens, memory=memory), atol=1e-5)  # a set of tokens
    assert not torch.allclose(dec(tokens, memory=moved), dec(tokens, memory=memory), atol=1e-3)  # a grid of them
    kw = {"sot_id": SOT, "eot_id": EOT, "pad_id": PAD, "max_new_tokens": 12}
    with torch.no_grad():
        dec.token_embed.weight.mul_(20)  # decisive logits, so that a wrong position would change the tokens
    for options in ({}, {"num_beams": 3}):  # cached keys and values carry the positions, beams reorder them
        assert generate(dec.eval(), memory, **kw, **options) == generate(dec, memory, use_cache=False, **kw, **options)
    plain.load_state_dict({k: v for k, v in dec.state_dict().items() if not k.startswith("memory_pos")})
    assert generate(dec, memory, **kw) != generate(plain.eval(), memory, **kw)  # the positions change the words
    rebuilt = TextDecoder(dec.cfg, 24)
    rebuilt.load_state_dict(dec.state_dict())  # the config alone rebuilds the layer a checkpoint holds
    assert torch.equal(rebuilt(tokens, memory=memory), dec(tokens, memory=memory))
    with pytest.raises(ValueError, match="square grid"):
        dec(tokens, memory=memory[:, :8])
