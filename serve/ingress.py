"""The HTTP face of the TMR application: a FastAPI ingress in front of the model deployments.

One request runs the composite model of the paper, step by step, each step on its own deployment:

1. noun phrases of the sentence (``PhraseParser``), the divergence scores of (text, image) (Eq. 4,
   ``DivergenceEstimator``) and the extractor's length check, concurrently;
2. the back-translated image v' (Eq. 3): generated now in ``full`` mode (``BackTranslator``,
   through the batch job's content-addressed cache), only looked up in that cache in ``fast`` mode;
3. the phrases grounded in v and in v' (``Grounder``), concurrently;
4. entities (Eq. 7-9, ``NERExtractor``) or the relation (Eq. 10-11, ``REExtractor``).

:class:`Pipeline` holds that order and calls its steps either through Serve handles (the
deployed app) or directly on in-process objects (the benchmark's baseline), so both run the
same code. The HTTP policy (token, body, text and image limits, storage prefixes, error bodies)
lives in :func:`build_api` and :class:`RequestGuard`: every input problem is a 4xx naming the
field, found before the request reaches a model batch. Every extraction response carries a ``Server-Timing`` header with the
milliseconds of each step as the ingress saw them (``image``, ``features``, ``back_translation``,
``grounding``, ``extract``), so a slow request shows where its time went (browsers' dev tools
and ``benchmarks.bench_serve`` read it).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import logging
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.datastructures import Headers
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field
from ray import serve
from starlette.exceptions import HTTPException

from jobs._config import cut, shown
from serve.schemas import (
    BackTranslationInfo,
    Divergence,
    Entity,
    ErrorBody,
    Health,
    InputError,
    Mode,
    ModelInfo,
    ModelsResponse,
    NERRequest,
    NERResponse,
    RERequest,
    REResponse,
)
from tmr_core.schema import ALIGNMENT_CATEGORIES

logger = logging.getLogger("ray.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Routes that serve no data (the page, its assets, the API schema) and the liveness probe stay
# open: a browser cannot send a bearer header when it navigates to the page.
PUBLIC_PATHS = ("/healthz", "/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/favicon.ico")
# /docs and /redoc load Swagger UI and ReDoc from files the fastapi-offline wheel ships, served
# here: the API docs work on a cluster without internet (FastAPI's defaults load them from a CDN).
DOCS_ASSETS = "/static-docs"
PUBLIC_PREFIXES = ("/static/", f"{DOCS_ASSETS}/")
CACHE_ID = re.compile(r"^[0-9a-f]{64}$")
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


class IngressSettings(BaseModel):
    """The ingress's request policy and what it needs to find cached back-translations."""

    default_mode: Mode = "fast"
    image_uri_prefixes: list[str] = Field(default_factory=list)
    max_image_bytes: int = 10_000_000
    max_image_side: int = 4096
    # Longer side over shorter side: ViLT's resize turns a ~20:1 image into a zero-pixel side.
    max_image_aspect: float = 10.0
    max_request_bytes: int = 16_000_000
    max_text_chars: int = 4000
    auth_token_env: str | None = "TMR_SERVE_TOKEN"
    cache_uri: str = ".cache/back_translations"
    generation: dict[str, Any] = Field(default_factory=dict)
    base_seed: int = 0
    seed_per_sample: bool = False
    storage_endpoint_url: str | None = None
    storage_region: str | None = None

    def storage_options(self):
        from tmr_core.storage import StorageOptions

        return StorageOptions(endpoint_url=self.storage_endpoint_url, region=self.storage_region)

    def generation_settings(self):
        from tmr_core.back_translation import GenerationSettings

        return GenerationSettings(**self.generation)


# ----------------------------------------------------------------------------- the pipeline


class StepTimer:
    """Milliseconds per named step of one request, rendered as a ``Server-Timing`` header."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, float]] = []

    @contextmanager
    def step(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.steps.append((name, 1000 * (time.perf_counter() - started)))

    def header(self) -> str:
        return ", ".join(f"{name};dur={ms:.2f}" for name, ms in self.steps)


async def call(target: Any, method: str, *args: Any) -> Any:
    """``target.method(*args)`` through a Serve handle, or directly on an in-process step object.

    In process there is no Serve batching: a batched step's plain ``<method>_many`` runs on a
    list of one (the item is the argument tuple, or the single argument).
    """
    if isinstance(target, serve.handle.DeploymentHandle):
        return await getattr(target, method).remote(*args)
    many = getattr(target, f"{method}_many", None)
    if many is not None:
        from serve.deployments import raise_if_failed

        return raise_if_failed(many([args if len(args) > 1 else args[0]])[0])
    return await getattr(target, method)(*args)


class Pipeline:
    """The composite TMR model, one step per deployment (see the module docstring).

    Args:
        phrases, grounder, back_translator, mde, ner, re: the steps, as Serve handles or as
            in-process objects with the same async methods; ``re`` may be ``None`` (no RE model).
        settings: what fast mode needs to look up the back-translation cache.
    """

    def __init__(self, phrases, grounder, back_translator, mde, ner, re, settings: IngressSettings):
        self.phrases, self.grounder, self.back_translator = phrases, grounder, back_translator
        self.mde, self.ner, self.re = mde, ner, re
        self.settings = settings
        self.storage_options = settings.storage_options()
        self._generation = None  # filled from the BackTranslator on the first fast-mode lookup

    async def models(self) -> list[dict]:
        targets = [self.ner, self.re, self.mde, self.grounder, self.back_translator, self.phrases]
        return await asyncio.gather(*(call(t, "info") for t in targets if t is not None))

    async def ner_request(self, request: NERRequest, image: bytes | None,
                          timer: StepTimer | None = None) -> NERResponse:
        timer = timer or StepTimer()
        mode = request.mode or self.settings.default_mode
        tokens = request.words()
        row, extras = await self._features(self.ner, tokens, image, mode, request.sample_id, timer)
        with timer.step("extract"):
            prediction = await call(self.ner, "predict", row)
        entities = [Entity(text=" ".join(tokens[e["start"]:e["end"]]), **e) for e in prediction["entities"]]
        return NERResponse(tokens=tokens, mode=mode, entities=entities, **extras)

    async def re_request(self, request: RERequest, image: bytes | None,
                         timer: StepTimer | None = None) -> REResponse:
        timer = timer or StepTimer()
        if self.re is None:
            raise InputError("path", "this server has no relation extraction model (re_model is null)", 404, "not_found")
        mode = request.mode or self.settings.default_mode
        tokens = request.words()
        row, extras = await self._features(self.re, tokens, image, mode, request.sample_id, timer)
        row["head"] = {"name": " ".join(tokens[request.head.start:request.head.end]), **request.head.model_dump()}
        row["tail"] = {"name": " ".join(tokens[request.tail.start:request.tail.end]), **request.tail.model_dump()}
        with timer.step("extract"):
            prediction = await call(self.re, "predict", row)
        return REResponse(
            tokens=tokens, mode=mode, head=request.head, tail=request.tail,
            relation=prediction["relation"], probabilities=prediction["probabilities"], **extras,
        )

    async def _features(self, extractor, tokens: list[str], image: bytes | None, mode: Mode,
                        sample_id: str | None, timer: StepTimer) -> tuple[dict, dict]:
        """Steps 1-3: the extractor's input row and the response fields they produce."""
        from tmr_core.inference import prompts_and_seeds

        with timer.step("features"):
            _, phrases, divergence = await asyncio.gather(
                call(extractor, "check", tokens),
                call(self.phrases, "parse", tokens),
                call(self.mde, "score", tokens, image) if image is not None else _none(),
            )
        (prompt,), (seed,) = prompts_and_seeds([{"id": sample_id, "tokens": tokens}], self.settings.base_seed,
                                               self.settings.seed_per_sample)
        with timer.step("back_translation"):
            if mode == "full":
                back_translation = await call(self.back_translator, "generate", prompt, seed)
            else:
                generation = await self._generation_settings()
                back_translation = await asyncio.to_thread(self._cached_back_translation, generation, prompt, seed)
        bt_uri = back_translation["uri"]
        phrase_texts = [p["text"] for p in phrases]
        with timer.step("grounding"):
            regions, bt_regions = await asyncio.gather(
                call(self.grounder, "ground", image, phrase_texts) if image is not None else _none([]),
                call(self.grounder, "ground", bt_uri, phrase_texts) if bt_uri else _none([]),
            )
        row = {
            "tokens": tokens,
            "phrases": phrases,
            "image": image,
            "regions": regions,
            "back_translation_uri": bt_uri,
            "back_translation_regions": bt_regions,
            "divergence": divergence,
        }
        key = Path(bt_uri).stem if bt_uri else None
        extras = {
            "divergence": Divergence(**dict(zip(ALIGNMENT_CATEGORIES, divergence, strict=True)))
            if divergence is not None else None,
            "back_translation": BackTranslationInfo(
                used=bt_uri is not None, id=key, url=f"/v1/back-translations/{key}" if key else None,
                cached=back_translation["cached"], error=back_translation["error"],
            ),
            "phrases": phrase_texts,
        }
        return row, extras

    async def _generation_settings(self):
        """The generation settings with the pipeline identity the BackTranslator computed: the
        cache key names a pipeline by its content, which only the replica that loaded it knows
        (a ``models:/`` URI names no folder here)."""
        if self._generation is None:
            import dataclasses

            from tmr_core.back_translation import with_identity

            settings = self.settings.generation_settings()
            if self.back_translator is None:  # no generator to ask: hash the folder here, once
                self._generation = with_identity(settings)
            else:
                identity = await call(self.back_translator, "identity")
                self._generation = dataclasses.replace(settings, model_identity=identity)
        return self._generation

    def _cached_back_translation(self, generation, prompt: str, seed: int) -> dict:
        """Fast mode: the batch job's image for this prompt and seed if it exists and decodes;
        never generate. A cached file that does not decode is a miss (the grounder and the
        extractor would fail on it); full mode, or the batch job's next run, regenerates it."""
        from tmr_core import storage
        from tmr_core.back_translation import cache_key, cache_uri_for, cached_image_decodes

        uri = cache_uri_for(self.settings.cache_uri, cache_key(generation, seed, prompt))
        if storage.exists(uri, self.storage_options):
            if cached_image_decodes(uri, self.storage_options):
                return {"uri": uri, "error": None, "cached": True}
            logger.warning("cached back-translation %s does not decode; answering without it "
                           "(a full-mode request or the batch job regenerates it)", uri)
        return {"uri": None, "error": None, "cached": False}

    def back_translation_uri(self, key: str) -> str:
        from tmr_core.back_translation import cache_uri_for

        return cache_uri_for(self.settings.cache_uri, key)


async def _none(value: Any = None) -> Any:
    return value


# ----------------------------------------------------------------------------- request images


def decode_base64_image(text: str, settings: IngressSettings) -> bytes:
    """The bytes of a base64 (or ``data:`` URL) image, checked like any uploaded image."""
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    if len(text) * 3 // 4 > settings.max_image_bytes + 3:
        raise InputError("image", f"image is over the size limit of {settings.max_image_bytes} bytes", 413, "too_large")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InputError("image", f"not valid base64 ({error})", 422, "invalid_base64") from None
    return check_image(data, "image", settings)


def read_image_uri(uri: str, settings: IngressSettings) -> bytes:
    """Read ``image_uri`` if it lies under a configured storage prefix; never fetch other URLs.

    Whatever the storage layer says about the path (a folder, a name too long, no permission)
    is the request's problem, named ``image_uri``, never a 500.
    """
    import pyarrow.fs as pafs

    from tmr_core import storage

    if CONTROL_CHARACTERS.search(uri):
        raise InputError("image_uri", "contains a control character (e.g. NUL); send a plain path or s3:// URI",
                         422, "invalid_uri")
    if not _under_allowed_prefix(uri, settings.image_uri_prefixes):
        allowed = settings.image_uri_prefixes or "none configured"
        raise InputError("image_uri", f"{shown(uri)} is not under an allowed storage prefix ({allowed})", 403,
                         "forbidden")
    options = settings.storage_options()
    try:
        fs, path = storage.resolve(uri, options)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise InputError("image_uri", f"{shown(uri)} does not exist", 404, "not_found")
        if info.type != pafs.FileType.File:
            raise InputError("image_uri", f"{shown(uri)} is a folder, not an image file", 422, "not_a_file")
        if (info.size or 0) > settings.max_image_bytes:
            raise InputError("image_uri", f"image is over the size limit of {settings.max_image_bytes} bytes", 413,
                             "too_large")
        data = storage.read_bytes(uri, options)
    except (OSError, ValueError) as error:  # InputError is a ValueError: pass it on as it is
        if isinstance(error, InputError):
            raise
        raise InputError("image_uri", f"{shown(uri)} cannot be read ({type(error).__name__}: "
                         f"{cut(str(error))})", 422, "unreadable") from None
    return check_image(data, "image_uri", settings)


def _under_allowed_prefix(uri: str, prefixes: list[str]) -> bool:
    if "\\" in uri or any(part == ".." for part in re.split(r"[/]", uri)):
        return False
    for prefix in prefixes:
        if prefix.startswith(("s3://", "s3a://", "gs://")):
            if uri.startswith(prefix.rstrip("/") + "/"):
                return True
        elif "://" not in uri and not uri.startswith("file:"):
            root = os.path.realpath(prefix)
            if os.path.realpath(uri).startswith(root.rstrip(os.sep) + os.sep):
                return True
    return False


def check_image(data: bytes, field: str, settings: IngressSettings) -> bytes:
    """Reject images over the byte or pixel limits or that do not decode; return the bytes."""
    from PIL import Image

    if len(data) > settings.max_image_bytes:
        raise InputError(field, f"image is over the size limit of {settings.max_image_bytes} bytes", 413, "too_large")
    if not data:
        raise InputError(field, "image is empty", 422, "invalid_image")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size  # from the header: checked before decoding any pixels
            if max(width, height) > settings.max_image_side:
                raise InputError(
                    field, f"image is {width}x{height} px, over the limit of {settings.max_image_side} px a side",
                    413, "too_large",
                )
            if max(width, height) > settings.max_image_aspect * max(min(width, height), 1):
                raise InputError(
                    field, f"image is {width}x{height} px: its long side is over {settings.max_image_aspect:g} times "
                    "its short side, which the models cannot resize; crop or pad it", 422, "bad_aspect_ratio",
                )
            image.load()
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise InputError(field, f"not a decodable image ({type(error).__name__}: {error})", 422, "invalid_image") from None
    return data


def check_text(request: NERRequest | RERequest, settings: IngressSettings) -> None:
    """Reject text over ``max_text_chars`` before any model sees it (the word-piece limit needs
    the tokenizer, on the extractor's replica; this costs nothing)."""
    field = "text" if request.text is not None else "tokens"
    chars = len(request.text) if request.text is not None else len(" ".join(request.tokens or []))
    if chars > settings.max_text_chars:
        raise InputError(field, f"{field} is {chars} characters, over the limit of {settings.max_text_chars}; "
                         "send one sentence or post", 422, "too_long")


async def request_image(request: NERRequest | RERequest, settings: IngressSettings) -> bytes | None:
    if request.image is not None:
        return await asyncio.to_thread(decode_base64_image, request.image, settings)
    if request.image_uri is not None:
        return await asyncio.to_thread(read_image_uri, request.image_uri, settings)
    return None


# ----------------------------------------------------------------------------- the HTTP API


def error_response(status: int, details: list[dict], headers: dict[str, str] | None = None) -> JSONResponse:
    """The one error body: ``{"detail": [{"field", "loc", "msg", "type"}]}``. Strings are made
    encodable first: a client's field name or value may hold a lone surrogate (``"\\ud800"`` in
    JSON), which would otherwise fail the error response itself with a 500."""
    return JSONResponse(status_code=status, content={"detail": _encodable(details)}, headers=headers)


def _encodable(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, list | tuple):
        return [_encodable(v) for v in value]
    if isinstance(value, dict):
        return {_encodable(k): _encodable(v) for k, v in value.items()}
    return value


class RequestTooLarge(HTTPException):
    """Raised from the body stream as soon as it passes the limit; an ``HTTPException``, so
    FastAPI's body parsing passes it on instead of calling it a parse error (400)."""

    def __init__(self, limit: int):
        super().__init__(413, [{"field": "body", "loc": ["body"], "type": "too_large",
                                "msg": f"request body is over {limit} bytes; send a smaller image"}])


# What a status means for the client when the framework (not a route) refuses a request.
_FRAMEWORK_ERRORS = {
    400: ("body", "invalid_body", "send a UTF-8 JSON object"),
    404: ("path", "not_found", "see /docs for the routes"),
    405: ("method", "method_not_allowed", "see /docs for each route's method"),
}


def http_error_details(error: HTTPException) -> list[dict]:
    """An ``HTTPException`` (ours, or the framework's: unparsable body, unknown route, wrong
    method) as the documented error items."""
    if isinstance(error.detail, list):
        return error.detail
    field, kind, advice = _FRAMEWORK_ERRORS.get(error.status_code, ("body", "http_error", "see /docs"))
    return [{"field": field, "loc": [field] if field != "body" else ["body"], "type": kind,
             "msg": f"{error.detail}; {advice}"}]


def validation_details(error: RequestValidationError) -> tuple[int, list[dict]]:
    """FastAPI's validation errors with a ``field`` each and without echoing the input back."""
    status, details = 422, []
    for item in error.errors():
        loc = [part for part in item.get("loc", ()) if part != "body"]
        ctx = item.get("ctx") or {}
        field = ctx.get("field") or ".".join(str(p) for p in loc if not isinstance(p, int))
        kind = item.get("type", "value_error")
        if kind == "json_invalid":
            status, field = 400, "body"
        details.append({"field": field or "body", "loc": ["body", *loc], "msg": str(item.get("msg")), "type": kind})
    return status, details


class RequestGuard:
    """The bearer-token check, the body-size limit and the last-resort 500, as plain ASGI
    middleware: Starlette's ``BaseHTTPMiddleware`` (``@app.middleware("http")``) added 1-2 ms to
    every request on a 2-core node (measured on a no-op Serve app); this adds next to nothing.

    The size limit holds for bodies without a ``Content-Length`` too (chunked uploads): the bytes
    are counted as they arrive and the request is answered 413 as soon as they pass the limit,
    before the rest is read or parsed."""

    def __init__(self, app: Any, token: str | None, max_request_bytes: int):
        self.app, self.token, self.max_request_bytes = app, token, max_request_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rejection = self._rejection(scope)
        if rejection is not None:
            return await rejection(scope, receive, send)
        started = False
        received = 0

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        async def counting_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_request_bytes:
                    raise RequestTooLarge(self.max_request_bytes)
            return message

        try:
            await self.app(scope, counting_receive, tracking_send)
        except Exception as error:  # a bug or a failed replica answers 500; it never takes the ingress down
            if isinstance(error, InputError):  # raised inside a deployment, surfaced through its handle
                response = error_response(error.status, [error.detail()])
            elif isinstance(error, HTTPException):  # e.g. RequestTooLarge outside a route's body parsing
                response = error_response(error.status_code, http_error_details(error))
            else:
                logger.exception("request to %s failed", scope.get("path"))
                response = error_response(500, [{"field": "body", "loc": [], "type": "internal_error",
                                                 "msg": "internal error; see the server log"}])
            if not started:
                await response(scope, receive, send)

    def _rejection(self, scope: dict) -> JSONResponse | None:
        headers, path = Headers(scope=scope), scope.get("path", "")
        if self.token and path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES):
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                return error_response(401, [{"field": "Authorization", "loc": ["header", "authorization"],
                                             "msg": "missing or wrong bearer token", "type": "unauthorized"}])
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_request_bytes:
            return error_response(413, RequestTooLarge(self.max_request_bytes).detail)
        return None


def build_api(pipeline: Pipeline, settings: IngressSettings, token: str | None) -> FastAPI:
    """The FastAPI app: routes, the token check, the body size limit and JSON error bodies."""
    api = FastAPIOffline(
        static_url=DOCS_ASSETS,
        title="TMR: multimodal entity and relation extraction",
        description=(
            "Named entities and relations in a sentence, helped by its image and by an image generated "
            "from the sentence (TMR, ACL 2023). Every route but `/healthz` and the static page needs "
            "`Authorization: Bearer <token>` when the server has a token. Errors are "
            "`{\"detail\": [{\"field\", \"loc\", \"msg\", \"type\"}]}`."
        ),
        version="1.0",
    )
    bearer = HTTPBearer(auto_error=False, description="The server's token (env var named by auth_token_env).")
    errors = {400: {"model": ErrorBody}, 401: {"model": ErrorBody}, 403: {"model": ErrorBody},
              413: {"model": ErrorBody}, 422: {"model": ErrorBody}}

    api.add_middleware(RequestGuard, token=token, max_request_bytes=settings.max_request_bytes)

    @api.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError):
        status, details = validation_details(error)
        return error_response(status, details)

    @api.exception_handler(InputError)
    async def on_input_error(request: Request, error: InputError):
        return error_response(error.status, [error.detail()])

    @api.exception_handler(HTTPException)
    async def on_http_error(request: Request, error: HTTPException):
        return error_response(error.status_code, http_error_details(error), getattr(error, "headers", None))

    @api.get("/healthz", response_model=Health, tags=["ops"])
    async def healthz() -> Health:
        """Liveness: the ingress answers (never needs the token)."""
        return Health()

    @api.get("/v1/models", response_model=ModelsResponse, responses=errors, tags=["ops"],
             dependencies=[_security(bearer)])
    async def models() -> ModelsResponse:
        """The models behind each step: name, registry version and where they were loaded from."""
        infos = await pipeline.models()
        return ModelsResponse(default_mode=settings.default_mode, models=[ModelInfo(**i) for i in infos])

    async def timed_extraction(body: NERRequest | RERequest, response: Response, extract):
        check_text(body, settings)
        timer = StepTimer()
        with timer.step("image"):
            image = await request_image(body, settings)
        result = await extract(body, image, timer)
        response.headers["Server-Timing"] = timer.header()
        return result

    @api.post("/v1/ner", response_model=NERResponse, responses=errors, tags=["extraction"],
              dependencies=[_security(bearer)])
    async def ner(body: NERRequest, response: Response) -> NERResponse:
        """Named entities of the sentence (PER, LOC, ORG, MISC), the divergence scores of the
        (text, image) pair and the back-translated image used."""
        return await timed_extraction(body, response, pipeline.ner_request)

    @api.post("/v1/re", response_model=REResponse, responses=errors, tags=["extraction"],
              dependencies=[_security(bearer)])
    async def relation(body: RERequest, response: Response) -> REResponse:
        """The relation between the head and tail spans, with every label's probability."""
        return await timed_extraction(body, response, pipeline.re_request)

    @api.get("/v1/back-translations/{image_id}", responses={200: {"content": {"image/png": {}}}, **errors},
             response_class=Response, tags=["extraction"], dependencies=[_security(bearer)])
    async def back_translation(image_id: str) -> Response:
        """A back-translated image from the cache, by the id a prediction returned."""
        from tmr_core import storage
        from tmr_core.back_translation import image_decodes

        if not CACHE_ID.match(image_id):
            raise InputError("image_id", "expected the 64 hex characters a prediction returned", 422)
        uri = pipeline.back_translation_uri(image_id)
        if not storage.exists(uri, pipeline.storage_options):
            raise InputError("image_id", "no such back-translated image", 404, "not_found")
        data = await asyncio.to_thread(storage.read_bytes, uri, pipeline.storage_options)
        if not await asyncio.to_thread(image_decodes, data):  # a truncated cache file is no image to serve
            raise InputError("image_id", "the cached back-translated image is unreadable; a full-mode request "
                             "or the batch job regenerates it", 404, "not_found")
        return Response(content=data, media_type="image/png")

    @api.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @api.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        # browsers ask for /favicon.ico whatever the page links: answer it instead of a 404
        return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml")

    api.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return api


def api_token(env: str | None) -> str | None:
    """The bearer token from the environment variable ``env``; ``None`` (an open API, with a
    warning in the log) when no variable is configured or it is unset or empty. An empty value is
    how an operator opens the API on purpose (e.g. a local demo); the server starts either way.
    Surrounding whitespace is dropped: a token mounted from a file often ends with a newline."""
    if not env:
        logger.warning("auth_token_env is null: the TMR API is open to anyone who can reach this server")
        return None
    token = os.environ.get(env)
    if token is None:
        logger.warning("%s is not set: the TMR API is open to anyone who can reach this server; "
                       "set it to require 'Authorization: Bearer <token>'", env)
        return None
    if not token.strip():
        logger.warning("%s is set but empty: the TMR API is open to anyone who can reach this server "
                       "(as asked); give it a value to require a bearer token", env)
        return None
    return token.strip()


def _security(bearer: HTTPBearer):
    # Declares the bearer scheme in the OpenAPI schema; the guard middleware does the check.
    from fastapi import Security

    return Security(bearer)


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
@serve.ingress()
class TMRIngress:
    """FastAPI ingress: HTTP policy here, the model steps on their own deployments.

    Args:
        phrases, grounder, back_translator, mde, ner, re: handles of the step deployments
            (``re`` may be ``None``).
        settings: :class:`IngressSettings` as a dict.
    """

    def __init__(self, phrases, grounder, back_translator, mde, ner, re, settings: dict):
        self.settings = IngressSettings(**settings)
        self.pipeline = Pipeline(phrases, grounder, back_translator, mde, ner, re, self.settings)
        # Read per replica from its environment (a Kubernetes secret, a runtime_env var), never
        # passed through the app config where the dashboard would show it.
        self.token = api_token(self.settings.auth_token_env)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self.pipeline, self.settings, self.token)
