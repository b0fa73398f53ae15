"""Request and response bodies of the service's JSON routes, so that /docs shows each one's real schema.

The response models say exactly what the routes return today (the same keys, ``None`` values included), and the
tests pin that JSON. Chat and job bodies live beside their logic, in :mod:`.chat` and :mod:`.jobs`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_K = 1000
MAX_ID = 2**63 - 1  # SQLite's largest INTEGER: the range of every image id
MAX_WEIGHT = 1e6  # a search term's weight; the query is normalised, so larger ones only risk overflow

ImageId = Annotated[int, Field(ge=0, le=MAX_ID, description="an indexed image's id")]


class Body(BaseModel):
    """A request body: numbers must be finite (NaN and Infinity are refused with 422, never passed on)."""

    model_config = ConfigDict(allow_inf_nan=False)


# ---- OpenAI: /v1/models, /v1/embeddings -------------------------------------------------------------------


class EmbeddingRequest(Body):
    """OpenAI's embeddings request, plus ``modality``: images are sent as data URLs (``data:image/png;base64,...``)."""

    input: str | list[str] = Field(description="a text or a list of texts (or of image data URLs)")
    model: str | None = Field(None, description="the served model's id (see /v1/models); optional")
    modality: Literal["text", "image"] = Field("text", description="what the inputs are")
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32")
    dimensions: int | None = Field(None, description="not supported: the model's own width is returned")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int = Field(description="the input's position in the request")
    embedding: list[float] | str = Field(description="the vector, or base64 of little-endian float32")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int = Field(description="words in the texts (0 for images)")
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    """OpenAI's embeddings response."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="when the service started (unix seconds)")
    owned_by: str = "mmfusion"
    role: Literal["embedder", "captioner", "answerer"] = Field(description="what the model does here")


class ModelList(BaseModel):
    """OpenAI's model list: every served model with its role."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- search -------------------------------------------------------------------------------------------------


class SearchTerm(Body):
    weight: float = Field(1.0, ge=-MAX_WEIGHT, le=MAX_WEIGHT)
    text: str | None = None
    image: str | None = Field(None, description="an image as a data URL")
    id: ImageId | None = Field(None, description="an indexed image's id: more like it")


class SearchRequest(Body):
    """Search the index by a text, an image, an indexed image, or a weighted sum of them."""

    text: str | None = None
    image: str | None = Field(None, description="an image as a data URL")
    id: ImageId | None = Field(None, description="an indexed image's id")
    terms: list[SearchTerm] = Field(default_factory=list, description="weighted terms, added to the above")
    k: int = Field(20, ge=1, le=MAX_K)
    threshold: float | None = Field(None, description="drop results with a lower cosine similarity")
    path: str | None = Field(None, description="only files whose path matches this glob or contains this text")
    after: float | None = Field(None, description="only images taken (or modified) after this unix time")
    before: float | None = None
    rerank: bool = Field(
        False,
        description="re-order the top results with the service's cross-attention re-ranker (needs a text; "
        "scores become the re-ranker's, the cosine stays as metadata.similarity)",
    )


class SearchHit(BaseModel):
    id: int = Field(description="the indexed image's id (for /images, /thumbs, more-like-this and labels)")
    score: float = Field(
        description="cosine similarity to the query (with rerank=true, the re-ranker's score), rounded to 6 digits"
    )
    name: str = Field(description="the file's name (never its path)")
    metadata: dict[str, Any] = Field(
        description="width, height, format, size, modified, taken, media; a video's also start, end, thumb (seconds) "
        "and segments (its matching segments, best first: start, end, thumb, score)"
    )
    image_url: str = Field(description="the image; for a video, its matched frame")
    thumbnail_url: str = Field(description="a JPEG thumbnail; for a video, of its matched frame")
    media: Literal["image", "video"] = Field("image", description="what the indexed file is")
    start: float | None = Field(None, description="a video: the matching segment's start, in seconds")
    end: float | None = Field(None, description="a video: the matching segment's end, in seconds")
    video_url: str | None = Field(None, description="a video: the file (HTTP Range requests work, so players seek)")


class SearchResponse(BaseModel):
    results: list[SearchHit] = Field(description="best first")


# ---- labels -------------------------------------------------------------------------------------------------


class ClassifyRequest(Body):
    labels: list[str] = Field(min_length=1)
    image: str | None = Field(None, description="an image as a data URL")
    id: ImageId | None = Field(None, description="or an indexed image's id")
    templates: list[str] | None = Field(None, description="prompt templates with {} (default: 16 photo prompts)")
    k: int = Field(5, ge=1, le=2000)
    threshold: float | None = Field(None, description="return every label scoring at least this instead of top k")


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyResponse(BaseModel):
    labels: list[LabelScore] = Field(description="best first")
    score: Literal["softmax", "sigmoid", "cosine"] = Field(description="what the scores are")


# ---- the service --------------------------------------------------------------------------------------------


class Health(BaseModel):
    """Liveness and what is loaded."""

    status: Literal["ok"] = "ok"
    model: str | None = Field(description="the embedder's id; null when none is loaded")
    images: int | None = Field(description="images in the index; null when no index is served")
    videos: int | None = Field(None, description="videos in the index (searched by segment); null without an index")
    index_version: int | None = Field(None, description="the published snapshot served (--snapshots); else null")
    captioner: str | None
    answerer: str | None
    labels: list[str] = Field(description="zero-shot labels the web page offers")
    auth: bool = Field(description="whether requests need an API key")
    uptime_s: float


class RunCard(BaseModel):
    """What a served model is, how it was trained and what it measured (read from its run directory)."""

    role: Literal["embedder", "captioner", "answerer"]
    id: str | None = Field(None, description="the model's id in /v1/models")
    source: str = Field(description="the folder (or hub id) it was loaded from, by name")
    family: str = Field(
        description="clip, captioner, vqa, ...; pretrained for hf: models, other for exports, missing when gone"
    )
    name: str
    what: str = Field(description="what the model does, in a line")
    trained_on: str | None = None
    quantize: str | None = None
    parameters: int | None = Field(None, description="parameters in its weights")
    training: dict[str, float] | None = Field(None, description="last logged step: step, samples, elapsed_s, loss")
    metrics: list[dict[str, Any]] = Field(default_factory=list, description="headline figures of each report")
    curve: bool = Field(False, description="whether /models/{role}/curve.png has its training curve")


class ModelCards(BaseModel):
    models: list[RunCard]
