"""Request and response bodies of the TMR HTTP API, and the one error shape every 4xx uses.

Requests are checked in two places, both answering with the same JSON body
``{"detail": [{"field": "image", "loc": ["body", "image"], "msg": "...", "type": "..."}]}``:

- here, by pydantic, for what a body alone can tell (missing or empty text, both or neither of
  ``text``/``tokens``, text that is not valid Unicode, spans outside the text, a bad ``mode``);
- in the ingress, for what needs the server's settings or the bytes (image size and decoding,
  ``image_uri`` prefixes, the model's maximum length), raising :class:`InputError`.

Spans are token offsets into ``tokens`` (``text`` split on whitespace), ``end`` exclusive, as in
the Parquet tables (``tmr_core.schema``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

Mode = Literal["fast", "full"]


class InputError(ValueError):
    """A request the server cannot serve, naming the field to fix; becomes a 4xx JSON body.

    It is raised in the ingress and in model deployments (per request, before batching), so a bad
    request never reaches a batch or takes a replica down.
    """

    def __init__(self, field: str, message: str, status: int = 422, kind: str = "value_error"):
        self.field, self.message, self.status, self.kind = field, message, status, kind
        super().__init__(f"{field}: {message}")

    def __reduce__(self):  # travels from a replica to the ingress through Ray
        return (InputError, (self.field, self.message, self.status, self.kind))

    def detail(self) -> dict:
        return {"field": self.field, "loc": ["body", *self.field.split(".")], "msg": self.message, "type": self.kind}


class TokenSpan(BaseModel):
    """A span of tokens: ``tokens[start:end]``."""

    model_config = ConfigDict(extra="forbid")

    start: int = Field(ge=0, description="First token of the span (0-based).")
    end: int = Field(gt=0, description="One past the last token of the span.")

    @model_validator(mode="after")
    def _end_after_start(self) -> TokenSpan:
        if self.end <= self.start:
            raise ValueError(f"end ({self.end}) must be greater than start ({self.start})")
        return self


class _TextImageRequest(BaseModel):
    """The sentence and its image, shared by ``/v1/ner`` and ``/v1/re``."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(
        None, description="The sentence; split on whitespace into tokens. Give this or `tokens`.",
        examples=["Kevin Durant joins the Golden State Warriors"],
    )
    tokens: list[str] | None = Field(None, description="The sentence already tokenized. Give this or `text`.")
    image: str | None = Field(
        None, description="The image, base64 (a `data:image/...;base64,` prefix is accepted). Or give `image_uri`."
    )
    image_uri: str | None = Field(
        None, max_length=1024,
        description="Path or s3:// URI of the image, under one of the server's allowed storage prefixes.",
    )
    mode: Mode | None = Field(
        None,
        description="`full`: generate the back-translated image now (cached); `fast`: only use a cached one, "
        "else the model's no-back-translation path. Default: the deployment's mode.",
    )
    sample_id: str | None = Field(
        None, max_length=256,
        description="Dataset sample id: with seed_per_sample, seeds the back-translation as the batch job "
        "does, so its cached image is found. Default: the text itself. Ignored otherwise.",
    )

    @field_validator("text", "image_uri", "sample_id")  # image: b64decode(validate=True) refuses non-ASCII
    @classmethod
    def _valid_unicode(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            _check_unicode(value, info.field_name)
        return value

    @field_validator("text")
    @classmethod
    def _text_not_blank(cls, text: str | None) -> str | None:
        if text is not None and not text.strip():
            raise ValueError("text is empty; send the sentence to analyse")
        return text

    @field_validator("tokens")
    @classmethod
    def _tokens_are_words(cls, tokens: list[str] | None) -> list[str] | None:
        if tokens is None:
            return None
        if not tokens:
            raise ValueError("tokens is empty; send at least one token")
        for i, token in enumerate(tokens):
            _check_unicode(token, f"token {i}")
            if not token or token != token.strip() or any(c.isspace() for c in token):
                raise ValueError(f"token {i} ({token!r}) must be non-empty and contain no whitespace")
        return tokens

    @model_validator(mode="before")
    @classmethod
    def _text_or_tokens(cls, data):
        if isinstance(data, dict):
            if data.get("text") is None and data.get("tokens") is None:
                raise _missing("text", "send `text` (a sentence) or `tokens` (a list of words)")
            if data.get("text") is not None and data.get("tokens") is not None:
                raise _conflict("tokens", "send `text` or `tokens`, not both")
            if data.get("image") is not None and data.get("image_uri") is not None:
                raise _conflict("image_uri", "send `image` or `image_uri`, not both")
        return data

    def words(self) -> list[str]:
        """The tokens the model sees."""
        return list(self.tokens) if self.tokens is not None else self.text.split()  # type: ignore[union-attr]


class NERRequest(_TextImageRequest):
    """Find the named entities (PER, LOC, ORG, MISC) in a sentence, helped by its image."""


class RERequest(_TextImageRequest):
    """Classify the relation between two entity spans of a sentence, helped by its image."""

    head: TokenSpan = Field(description="The head entity's token span.")
    tail: TokenSpan = Field(description="The tail entity's token span.")

    @field_validator("head", "tail")
    @classmethod
    def _span_inside_text(cls, span: TokenSpan, info: ValidationInfo) -> TokenSpan:
        tokens = info.data.get("tokens")
        text = info.data.get("text")
        count = len(tokens) if tokens is not None else len(text.split()) if text else None
        if count is not None and span.end > count:
            raise ValueError(f"span [{span.start}, {span.end}) is outside the text, which has {count} tokens")
        return span


# ------------------------------------------------------------------------------------ responses


class Entity(BaseModel):
    text: str = Field(description="The entity's tokens joined by spaces.")
    type: str = Field(description="PER, LOC, ORG or MISC.")
    start: int = Field(description="First token (0-based).")
    end: int = Field(description="One past the last token.")
    score: float = Field(description="Mean probability of the entity's tags.")


class Divergence(BaseModel):
    """The MDE's alignment of the text and its image (Eq. 4); the three sum to 1."""

    strengthen: float
    complement: float
    weaken: float


class Region(BaseModel):
    """A box the grounder found for a phrase (§3.2, V^r)."""

    phrase: str = Field(description="The noun phrase the box was found for.")
    box: list[float] = Field(description="[x1, y1, x2, y2] in pixels of the image it was found in.")
    score: float = Field(description="The detector's score.")


class BackTranslationInfo(BaseModel):
    """The image generated from the text (Eq. 3), if the request used one."""

    used: bool = Field(description="Whether the prediction used a back-translated image.")
    id: str | None = Field(None, description="Content address of the image in the cache.")
    url: str | None = Field(None, description="Where this server serves the image (needs the token too).")
    cached: bool = Field(False, description="The image was already in the cache.")
    error: str | None = Field(None, description="Why generation failed; the prediction then ran without it.")
    regions: list[Region] = Field(
        default_factory=list, description="The phrases grounded in the back-translated image (its pixels).")


class _Prediction(BaseModel):
    tokens: list[str]
    mode: Mode
    divergence: Divergence | None = Field(description="Null when the request had no image.")
    back_translation: BackTranslationInfo
    phrases: list[str] = Field(description="The noun phrases grounded in the images.")
    regions: list[Region] = Field(
        default_factory=list, description="The phrases grounded in the request's image (top-k boxes, its pixels).")


class NERResponse(_Prediction):
    entities: list[Entity]


class REResponse(_Prediction):
    head: TokenSpan
    tail: TokenSpan
    relation: str
    probabilities: dict[str, float] = Field(description="Probability of every relation label.")


class ExampleSpan(BaseModel):
    text: str = Field(description="The span's tokens joined by spaces.")
    start: int = Field(description="First token (0-based).")
    end: int = Field(description="One past the last token.")
    type: str | None = Field(None, description="NER: the entity type.")
    box: list[float] | None = Field(None, description="Where the image shows it ([x1, y1, x2, y2] px); null: it does not.")


class GoldLabels(BaseModel):
    """The benchmark's answer: NER entities, or the RE pair and its relation."""

    entities: list[ExampleSpan] = Field(default_factory=list, description="NER: every gold entity.")
    head: ExampleSpan | None = Field(None, description="RE: the head entity.")
    tail: ExampleSpan | None = Field(None, description="RE: the tail entity.")
    relation: str | None = Field(None, description="RE: the gold relation.")


class Example(BaseModel):
    """A test-split item of the synthetic benchmark the demo models were trained on."""

    id: str = Field(description="The benchmark's sample id (send it as `sample_id`).")
    task: Literal["ner", "re"]
    alignment: Literal["strengthen", "complement", "weaken"] = Field(description="How its image relates to its text.")
    text: str
    tokens: list[str]
    image: str = Field(description="The image as a `data:image/png;base64,` URL (post it as `image`).")
    gold: GoldLabels


class ExamplesResponse(BaseModel):
    examples: list[Example]


class ModelInfo(BaseModel):
    name: str = Field(description="What the model does in the pipeline (ner, re, mde, grounder, ...).")
    version: str | None = Field(description="Registry version, or null for a plain checkpoint.")
    source_uri: str = Field(description="Where it was loaded from (models:/..., a path, s3://...).")
    kind: str = Field(description="The class that runs it.")


class ModelsResponse(BaseModel):
    default_mode: Mode
    models: list[ModelInfo]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class ErrorItem(BaseModel):
    field: str = Field(description="The request field to fix, dotted (e.g. `head`, `image`).")
    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(BaseModel):
    detail: list[ErrorItem]


def _check_unicode(value: str, name: str) -> None:
    """JSON may carry a lone UTF-16 surrogate (``"\\ud800"``) that no model, tokenizer or response
    can encode: refuse it here, naming the field, instead of failing later with a 500."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{name} holds an unpaired surrogate ({value[error.start]!r} at character {error.start}), which is "
            "not valid Unicode; send the text as UTF-8"
        ) from None


def _missing(field: str, message: str):
    from pydantic_core import PydanticCustomError

    return PydanticCustomError("missing", "{field}: {message}", {"field": field, "message": message})


def _conflict(field: str, message: str):
    from pydantic_core import PydanticCustomError

    return PydanticCustomError("conflict", "{field}: {message}", {"field": field, "message": message})
