"""The HTTP face of the TMR application: a FastAPI ingress in front of one model deployment per task.

The ingress validates a request and forwards it: proxy → ingress → ``NERModel`` or ``REModel``
(:class:`serve.deployments.TMRModel`) is a request's whole path. The model deployment runs the
paper's composite model for a batch of requests in its own process (phrases, v' from the cache or,
in ``full`` mode, the ``BackTranslator``, grounding, divergence, extraction) and answers with each
step's milliseconds.

:class:`Pipeline` makes that call, through a Serve handle (the deployed app) or directly on an
in-process model object (the benchmark's baseline), so both run the same code. The HTTP policy
(token, body, text and image limits, storage prefixes, error bodies) lives in :func:`build_api`
and :class:`RequestGuard`: every input problem is a 4xx naming the field, found before the
request reaches a model batch. Every extraction response carries a ``Server-Timing`` header with
the milliseconds of each step (``image`` here; ``back_translation``, ``phrases``, ``grounding``,
``divergence``, ``extract`` inside the model deployment; ``model``, the whole call as the ingress
saw it), so a slow request shows where its time went (browsers' dev tools and
``benchmarks.bench_serve`` read it). ``/docs`` and ``/redoc`` load their scripts from this server.
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
from serve.deployments import call
from serve.schemas import (
    BackTranslationInfo,
    Divergence,
    Entity,
    ErrorBody,
    ExamplesResponse,
    Health,
    InputError,
    Mode,
    ModelInfo,
    ModelsResponse,
    NERRequest,
    NERResponse,
    Region,
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
    """The ingress's request policy and where the cached back-translations are (to serve them)."""

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
    storage_endpoint_url: str | None = None
    storage_region: str | None = None
    examples_dir: str | None = None

    def storage_options(self):
        from tmr_core.storage import StorageOptions

        return StorageOptions(endpoint_url=self.storage_endpoint_url, region=self.storage_region)


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
            self.add(name, 1000 * (time.perf_counter() - started))

    def add(self, name: str, ms: float) -> None:
        self.steps.append((name, ms))

    def header(self) -> str:
        return ", ".join(f"{name};dur={ms:.2f}" for name, ms in self.steps)


class Pipeline:
    """The ingress's side of a request: one call to the task's model deployment.

    Args:
        ner, re: the ``NERModel`` / ``REModel`` deployments' handles, or in-process
            :class:`serve.deployments.TMRModel` objects (benchmarks); ``re`` may be ``None``.
        settings: where the back-translation cache is (for ``/v1/back-translations``).
    """

    def __init__(self, ner, re, settings: IngressSettings):
        self.ner, self.re, self.settings = ner, re, settings
        self.storage_options = settings.storage_options()

    async def models(self) -> list[dict]:
        """Every step's model once (the NER and RE deployments share all but the extractor, and a
        task's own back-translator, ``back_translator_<task>``)."""
        infos = await asyncio.gather(*(call(m, "info") for m in (self.ner, self.re) if m is not None))
        return list({info["name"]: info for answer in infos for info in answer}.values())

    async def ner_request(self, request: NERRequest, image: bytes | None,
                          timer: StepTimer | None = None) -> NERResponse:
        mode = request.mode or self.settings.default_mode
        tokens = request.words()
        answer = await self._predict(self.ner, self._request(request, tokens, image, mode), timer or StepTimer())
        entities = [Entity(text=" ".join(tokens[e["start"]:e["end"]]), **e) for e in answer["entities"]]
        return NERResponse(tokens=tokens, mode=mode, entities=entities, **self._extras(answer))

    async def re_request(self, request: RERequest, image: bytes | None,
                         timer: StepTimer | None = None) -> REResponse:
        if self.re is None:
            raise InputError("path", "this server has no relation extraction model (re_model is null)", 404, "not_found")
        mode = request.mode or self.settings.default_mode
        tokens = request.words()
        body = {**self._request(request, tokens, image, mode),
                "head": request.head.model_dump(), "tail": request.tail.model_dump()}
        answer = await self._predict(self.re, body, timer or StepTimer())
        return REResponse(tokens=tokens, mode=mode, head=request.head, tail=request.tail,
                          relation=answer["relation"], probabilities=answer["probabilities"], **self._extras(answer))

    @staticmethod
    def _request(request: NERRequest | RERequest, tokens: list[str], image: bytes | None, mode: Mode) -> dict:
        return {"tokens": tokens, "image": image, "mode": mode, "sample_id": request.sample_id}

    @staticmethod
    async def _predict(model, body: dict, timer: StepTimer) -> dict:
        """The one hop: the model's answer, its steps' milliseconds, then the whole call's
        (``model``: the steps plus the hop, the batch wait and the (de)serialisation)."""
        started = time.perf_counter()
        answer = await call(model, "predict", body)
        for name, ms in answer["timing"].items():
            timer.add(name, ms)
        timer.add("model", 1000 * (time.perf_counter() - started))
        return answer

    @staticmethod
    def _extras(answer: dict) -> dict:
        """The response fields both tasks share."""
        back_translation = answer["back_translation"]
        uri = back_translation["uri"]
        key = Path(uri).stem if uri else None
        divergence = answer["divergence"]
        return {
            "divergence": Divergence(**dict(zip(ALIGNMENT_CATEGORIES, divergence, strict=True)))
            if divergence is not None else None,
            "back_translation": BackTranslationInfo(
                used=uri is not None, id=key, url=f"/v1/back-translations/{key}" if key else None,
                cached=back_translation["cached"], error=back_translation["error"],
                regions=[Region(**r) for r in answer["back_translation_regions"]],
            ),
            "phrases": answer["phrases"],
            "regions": [Region(**r) for r in answer["regions"]],
        }

    def back_translation_uri(self, key: str) -> str:
        from tmr_core.back_translation import cache_uri_for

        return cache_uri_for(self.settings.cache_uri, key)


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


# Below this many base64 characters (~190 kB of image) an image is decoded on the event loop: a
# thread hand-off costs more than the decoding (on a loaded 2-core node, several ms: measured by
# benchmarks.bench_serve); larger ones go to a thread so the ingress keeps answering meanwhile.
INLINE_IMAGE_CHARS = 256_000


async def request_image(request: NERRequest | RERequest, settings: IngressSettings) -> bytes | None:
    if request.image is not None:
        if len(request.image) <= INLINE_IMAGE_CHARS:
            return decode_base64_image(request.image, settings)
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

    @api.get("/v1/examples", response_model=ExamplesResponse, responses=errors, tags=["demo"],
             dependencies=[_security(bearer)])
    async def demo_examples() -> ExamplesResponse:
        """Test-split items of the synthetic benchmark the demo models know (one per task and
        alignment), with their images and gold labels; 404 when the server has none (examples_dir)."""
        from serve.examples import load_examples

        if settings.examples_dir is None:
            raise InputError("path", "this server has no examples (examples_dir is null)", 404, "not_found")
        try:
            examples = await asyncio.to_thread(load_examples, settings.examples_dir)
        except (FileNotFoundError, ValueError) as error:  # DataFormatError is a ValueError
            raise InputError("path", str(error), 404, "not_found") from None
        return ExamplesResponse(examples=examples)

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
    """FastAPI ingress: HTTP policy here, the composite model on one deployment per task.

    Args:
        ner, re: handles of the ``NERModel`` and ``REModel`` deployments (``re`` may be ``None``).
        settings: :class:`IngressSettings` as a dict.
    """

    def __init__(self, ner, re, settings: dict):
        self.settings = IngressSettings(**settings)
        self.pipeline = Pipeline(ner, re, self.settings)
        # Read per replica from its environment (a Kubernetes secret, a runtime_env var), never
        # passed through the app config where the dashboard would show it.
        self.token = api_token(self.settings.auth_token_env)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self.pipeline, self.settings, self.token)
