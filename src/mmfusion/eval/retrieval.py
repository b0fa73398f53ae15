"""Image-text retrieval metrics, as in the CLIP paper.

- Recall@K, image to text: a hit when *any* caption of the image is among the top K texts.
- Recall@K, text to image: a hit when the caption's own image is among the top K images.
- Mean and median rank (1 = first).
- Semantic precision@K (text to image): the fraction of the top K images that make the caption true,
  for datasets that know what captions mean (ShapesWorld). Generated captions repeat ("a red circle"
  fits many images), so exact-pair recall has a ceiling well below 1; semantic precision does not.

Ranks count the candidates scoring strictly higher than the correct one, so ties are never broken
against the model; identical texts are embedded once so they tie exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..interfaces import Embedder

CHUNK = 1024


@torch.no_grad()
def embed_images(
    embedder: Embedder, images: np.ndarray | Sequence[Image.Image], batch_size: int = 256, progress: bool = False
) -> torch.Tensor:
    """(N, D) normalised embeddings of uint8 arrays (N, H, W, 3) or PIL images, in batches."""
    out = []
    quiet = not progress or len(images) < 20 * batch_size
    for i in tqdm(range(0, len(images), batch_size), desc="embedding images", disable=quiet, leave=False):
        chunk = images[i : i + batch_size]
        pil = [Image.fromarray(a) if isinstance(a, np.ndarray) else a for a in chunk]
        out.append(embedder.encode_image(pil).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, embedder.embed_dim)


@torch.no_grad()
def embed_texts(embedder: Embedder, texts: Sequence[str], batch_size: int = 512) -> torch.Tensor:
    """(N, D) normalised embeddings; each distinct text is embedded once, so equal texts tie exactly."""
    unique: dict[str, int] = {}
    index = [unique.setdefault(t, len(unique)) for t in texts]
    keys = list(unique)
    parts = [embedder.encode_text(keys[i : i + batch_size]).float().cpu() for i in range(0, len(keys), batch_size)]
    emb = torch.cat(parts) if parts else torch.zeros(0, embedder.embed_dim)
    return emb[torch.as_tensor(index, dtype=torch.long)]


def _recall(ranks: torch.Tensor, ks: Sequence[int], prefix: str) -> dict[str, float]:
    out = {f"{prefix}_R@{k}": float((ranks < k).float().mean()) for k in ks}
    out[f"{prefix}_mean_rank"] = float((ranks + 1).float().mean())
    out[f"{prefix}_median_rank"] = float((ranks + 1).float().median())
    return out


def retrieval_metrics(
    image_emb: torch.Tensor, text_emb: torch.Tensor, text_image: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@K and ranks in both directions.

    Args:
        image_emb: (N_img, D) normalised image embeddings.
        text_emb: (N_txt, D) normalised text embeddings.
        text_image: (N_txt,) index of the image each text describes.
    """
    n_img = image_emb.shape[0]
    text_image = torch.as_tensor(text_image, dtype=torch.long)
    # text -> image: rank of the correct image among all images
    t2i = []
    for s in range(0, text_emb.shape[0], CHUNK):
        sim = text_emb[s : s + CHUNK] @ image_emb.t()  # (chunk, N_img)
        correct = sim.gather(1, text_image[s : s + CHUNK, None])  # (chunk, 1)
        t2i.append((sim > correct).sum(dim=1))
    # image -> text: rank of the best-scoring correct text
    i2t = []
    for s in range(0, n_img, CHUNK):
        sim = image_emb[s : s + CHUNK] @ text_emb.t()  # (chunk, N_txt)
        own = text_image[None, :] == torch.arange(s, min(s + CHUNK, n_img))[:, None]  # (chunk, N_txt)
        best = sim.masked_fill(~own, float("-inf")).max(dim=1, keepdim=True).values  # (chunk, 1)
        i2t.append((sim > best).sum(dim=1))
    return {**_recall(torch.cat(i2t), ks, "i2t"), **_recall(torch.cat(t2i), ks, "t2i")}


def semantic_precision(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    holds: Callable[[int, int], bool],
    ks: Sequence[int] = (1, 5, 10),
    groups: Sequence[str] | None = None,
) -> dict:
    """Mean fraction of the top-K images for each text that the text truly describes.

    Args:
        holds: ``holds(text_index, image_index)`` says whether the image makes the text true.
        groups: optional label per text (such as the kind of caption); adds ``semantic_P@1_by`` per label.
    """
    kmax = min(max(ks), image_emb.shape[0])
    per_text = np.zeros((text_emb.shape[0], len(ks)))
    for s in range(0, text_emb.shape[0], CHUNK):
        top = (text_emb[s : s + CHUNK] @ image_emb.t()).topk(kmax, dim=1).indices  # (chunk, kmax)
        for row, images in enumerate(top.tolist()):
            ok = np.cumsum([holds(s + row, i) for i in images])
            per_text[s + row] = [ok[min(k, kmax) - 1] / min(k, kmax) for k in ks]
    out: dict = {f"semantic_P@{k}": float(per_text[:, n].mean()) if len(per_text) else 0.0 for n, k in enumerate(ks)}
    if groups is not None:
        labels = np.asarray(groups)
        out["semantic_P@1_by"] = {g: float(per_text[labels == g, 0].mean()) for g in sorted(set(groups))}
        out["texts_by"] = {g: int((labels == g).sum()) for g in sorted(set(groups))}
    return out
