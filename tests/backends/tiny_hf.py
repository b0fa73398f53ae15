"""Tiny random Hugging Face models of the real families, saved to a directory as save_pretrained writes them.

Nothing is downloaded: configs are built small, weights drawn with a fixed seed, tokenizers made from a word
list with the ``tokenizers`` library.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = [
    "a",
    "an",
    "photo",
    "picture",
    "of",
    "red",
    "green",
    "blue",
    "yellow",
    "circle",
    "square",
    "triangle",
    "star",
    "dog",
    "cat",
    "on",
    "the",
    "beach",
    "big",
    "small",
    "two",
    "three",
    "left",
    "right",
    "above",
    "below",
    "sunset",
    "people",
]


def word_tokenizer(bos: str, eos: str, pad: str, add_bos: bool = True, **kwargs):
    """A fast tokenizer over WORDS (lower-cased, split on whitespace and punctuation)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys([pad, "<unk>", bos, eos]))
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.normalizer = normalizers.Lowercase()
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    single = f"{bos} $A {eos}" if add_bos else f"$A {eos}"
    t.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(s, vocab[s]) for s in dict.fromkeys([bos, eos]) if s in single]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=t, bos_token=bos, eos_token=eos, unk_token="<unk>", pad_token=pad, **kwargs
    )


def tiny_clip(path: Path, image_size: int = 32, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = word_tokenizer("<|startoftext|>", "<|endoftext|>", "<|endoftext|>")
    torch.manual_seed(seed)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=8)  # fmt: skip
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).eval().save_pretrained(path)
    ip = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(path)
    return Path(path)


def tiny_siglip(path: Path, image_size: int = 32, seed: int = 0) -> Path:
    from transformers import SiglipConfig, SiglipModel, SiglipProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    # as SigLIP's own tokenizer: no attention mask (the model was trained on text padded to 64 tokens)
    tok = word_tokenizer("</s>", "</s>", "<pad>", add_bos=False, model_input_names=["input_ids"], model_max_length=16)
    torch.manual_seed(seed)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=16, projection_size=32,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=8)  # fmt: skip
    SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval().save_pretrained(path)
    ip = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    SiglipProcessor(image_processor=ip, tokenizer=tok).save_pretrained(path)
    return Path(path)
