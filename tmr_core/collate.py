"""Batching: Parquet rows (see :mod:`tmr_core.schema`) → the tensors :class:`TMRExtractor` reads.

Text. Each original token is tokenized on its own; its **first word piece carries its label**
(as TMR-NER does) and gives its T^w vector. A token with no word piece (U+FE0F, U+200B, an empty
string …) gets no position and is masked — it never shifts the labels of the tokens after it.
The sequence is ``[CLS] pieces [SEP]`` cut to ``max_length`` pieces *including* [CLS]/[SEP] (and,
for RE, the four entity markers); a token is kept when its first piece fits. RE inserts TMR-RE's
markers ``[unused0] head [unused1]`` and ``[unused2] tail [unused3]`` (whichever comes first)
as single ids, and records where ``[unused0]``/``[unused2]`` landed (a cut marker falls back to
[CLS], position 0).

NER labels are per original token (``-100`` where masked), after turning orphan ``I-X`` into
``B-X`` (over all tokens, then over the kept ones) so the CRF sees a valid BIO path with the same
conlleval chunks as the gold tags.

Phrases (``phrases``: ``{text, start, end}`` token spans) become word-piece spans over their
first ``max_phrase_len`` tokens, at most ``max_phrases`` per sample; phrases with no kept piece
are dropped. Images are read by URI (:mod:`tmr_core.images`); a null URI gives ``image_mask``
False, and the top ``num_regions`` region boxes are cropped from their image, padded and masked;
an image with no usable box has itself as its one region (``TMRConfig.whole_image_region``).

Output keys (tensors; B samples, L pieces, W = most tokens in the batch, P phrases ≥ 1,
R = num_regions, S = the processor's image size):

    input_ids, attention_mask (B, L)      word_starts (B, W) long, word_mask (B, W) bool
    num_tokens (B,)                        phrase_spans (B, P, 2), phrase_mask (B, P)
    labels (B, W) NER / (B,) RE            entity_positions (B, 2) RE
    pixel_values (B, 3, S, S), image_mask (B,), region_pixel_values (B, R, 3, S, S), region_mask (B, R)
        (the region keys only with use_coarse)
    bt_* the same four for the back-translation (use_back_translation)
    divergence (B, 3) (use_mde), bt_divergence (B, 3) (back_translation_alpha="back_translation")

A row whose ``image_error`` (or ``back_translation_error``) is set is read as having no image,
and a row without a usable image and without MDE scores gets α = (0, 0, 1).

Labels are added when every row has them (``tags`` / ``relation``), so the same collator serves
training and inference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tmr_core import storage
from tmr_core.heads import repair_bio
from tmr_core.images import PixelCache, crop_regions, load_image

IGNORE_INDEX = -100
# A stage that could not use a row's image says why in this column (the row itself is kept).
ERROR_COLUMNS = {"image_uri": "image_error", "back_translation_uri": "back_translation_error"}
# α for a row with no usable image: nothing in it can strengthen or complement the text.
NO_IMAGE_ALPHA = (0.0, 0.0, 1.0)


@dataclass
class EncodedText:
    """One sample's word pieces and where its tokens, phrases and entity markers landed."""

    input_ids: list[int]
    word_starts: list[int]  # first-piece position per original token, -1 when masked
    phrase_spans: list[tuple[int, int]]
    entity_positions: tuple[int, int] | None
    truncated_from: int | None = None  # first token cut by max_length (None: every token fits)


def _listed(value: Any) -> list:
    """Parquet/Ray hand lists as lists, numpy arrays or None; give a plain list."""
    if value is None:
        return []
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return list(value.tolist())
    return list(value)


def _span(value: Mapping, where: str) -> tuple[int, int]:
    try:
        return int(value["start"]), int(value["end"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{where}: expected a span {{name|text, start, end}}, got {value!r}") from error


class TMRCollator:
    """Turn a list of table rows (or a dict of columns) into a model batch.

    Args:
        tokenizer: the text encoder's tokenizer (``AutoTokenizer``).
        image_processor: the image encoder's processor; may be None with ``config.text_only``.
        config: the extractor's :class:`tmr_core.extractor.TMRConfig` (task, labels, lengths, switches).
        storage_options: where ``s3://`` image URIs are served.
        skip_unreadable_images: mask an image whose URI is set but unreadable instead of raising
            (TMR-NER does this silently; default is to raise).
        pixel_cache_bytes: keep up to this many bytes of processed pixels (an image and its region
            crops, by URI and boxes) for the next time the same row comes (training epochs,
            per-epoch validation); 0: off. The processor handles each image on its own, so a cached
            row's pixels equal freshly processed ones; on the tiny CPU models the processor was a
            third of a training step.
    """

    def __init__(
        self,
        tokenizer: Any,
        image_processor: Any,
        config: Any,
        storage_options: storage.StorageOptions | None = None,
        skip_unreadable_images: bool = False,
        pixel_cache_bytes: int = 0,
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        self.storage_options = storage_options
        self.skip_unreadable_images = skip_unreadable_images
        self.pixel_cache_bytes = pixel_cache_bytes
        self._pixels = PixelCache(pixel_cache_bytes)
        self.label_ids = {label: index for index, label in enumerate(config.labels)}
        self.cls_id, self.sep_id, self.pad_id = (
            tokenizer.cls_token_id,
            tokenizer.sep_token_id,
            tokenizer.pad_token_id,
        )
        if None in (self.cls_id, self.sep_id, self.pad_id):
            raise ValueError("tokenizer: needs [CLS], [SEP] and [PAD] tokens (a BERT-family tokenizer)")
        self.marker_ids: list[int] = []
        if config.task == "re":
            self.marker_ids = [tokenizer.convert_tokens_to_ids(marker) for marker in config.entity_markers]
            missing = [
                m
                for m, i in zip(config.entity_markers, self.marker_ids, strict=True)
                if i in (None, tokenizer.unk_token_id)
            ]
            if missing:
                raise ValueError(
                    f"entity_markers: {missing} are not single tokens of the tokenizer's vocabulary"
                )
        self.pixel_shape: tuple[int, ...] | None = None
        if config.uses_images:
            if image_processor is None:
                raise ValueError("image_processor: required unless config.text_only")
            from PIL import Image

            # The processed size, for samples without an image.
            self.pixel_shape = tuple(self._process([Image.new("RGB", (8, 8))]).shape[1:])

    # ----- text -----------------------------------------------------------------------------

    def encode_text(self, row: Mapping, where: str) -> EncodedText:
        """Word pieces of one row, with first-piece positions, phrase spans and marker positions."""
        tokens = [str(token) for token in _listed(row.get("tokens"))]
        if not tokens:
            raise ValueError(f"{where}: 'tokens' is empty")
        pieces = self.tokenizer(tokens, add_special_tokens=False)["input_ids"]  # one list per token
        config = self.config
        opens: dict[int, list[int]] = {}
        closes: dict[int, list[int]] = {}
        if config.task == "re":
            for slot, key in ((0, "head"), (2, "tail")):
                start, end = _span(row.get(key), f"{where}: {key}")
                if not 0 <= start < end <= len(tokens):
                    raise ValueError(
                        f"{where}: {key} span [{start}, {end}) is outside the {len(tokens)} tokens"
                    )
                opens.setdefault(start, []).append(slot)
                closes.setdefault(end, []).append(slot + 1)

        budget = config.max_length - 1  # room before [SEP]
        ids = [self.cls_id]
        starts = [-1] * len(tokens)
        ends = [-1] * len(tokens)
        markers = [0, 0, 0, 0]
        truncated_from = None

        def put(piece: int) -> bool:
            if len(ids) >= budget:
                return False
            ids.append(piece)
            return True

        for index in range(len(tokens) + 1):
            for slot in sorted(closes.get(index, [])) + sorted(opens.get(index, [])):
                if put(self.marker_ids[slot]):
                    markers[slot] = len(ids) - 1
            if index == len(tokens):
                break
            for offset, piece in enumerate(pieces[index]):
                if not put(piece):
                    if offset == 0 and truncated_from is None:
                        truncated_from = index
                    break
                if offset == 0:
                    starts[index] = len(ids) - 1
                ends[index] = len(ids)
        ids.append(self.sep_id)

        spans = []
        for position, phrase in enumerate(_listed(row.get("phrases"))):
            if len(spans) >= config.max_phrases:
                break
            start, end = _span(phrase, f"{where}: phrases[{position}]")
            kept = [
                i
                for i in range(max(start, 0), min(end, start + config.max_phrase_len, len(tokens)))
                if starts[i] >= 0
            ]
            if kept:
                spans.append((starts[kept[0]], ends[kept[-1]]))
        entities = (markers[0], markers[2]) if config.task == "re" else None
        return EncodedText(ids, starts, spans, entities, truncated_from)

    def ner_labels(self, row: Mapping, starts: list[int], where: str) -> list[int]:
        """Tag ids per original token, ``-100`` where masked, orphan ``I-`` repaired over kept tokens."""
        tags = [str(tag) for tag in _listed(row.get("tags"))]
        if len(tags) != len(starts):
            raise ValueError(f"{where}: {len(tags)} tags for {len(starts)} tokens")
        kept = [i for i, start in enumerate(starts) if start >= 0]
        labels = [IGNORE_INDEX] * len(starts)
        # Repair over all tokens first (a hole tagged O splits a chunk, as conlleval reads the
        # gold), then over the kept ones (a dropped token may have carried a B-).
        whole = repair_bio(tags)
        for i, tag in zip(kept, repair_bio([whole[i] for i in kept]), strict=True):
            if tag not in self.label_ids:
                raise ValueError(
                    f"{where}: tag {tag!r} (token {i}) is not one of labels {list(self.label_ids)}"
                )
            labels[i] = self.label_ids[tag]
        return labels

    # ----- images ---------------------------------------------------------------------------

    def _process(self, images: list) -> torch.Tensor:
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def _load(self, uri: Any, where: str, cache: dict, error: Any = None):
        """The image at ``uri``; None when there is none or a stage recorded it as unusable
        (``error``: the row's ``image_error`` / ``back_translation_error``), which the model
        reads as a zero image, as TMR does."""
        from tmr_core.inference import has_image

        if not has_image(uri) or error:
            return None
        if isinstance(uri, (bytes, bytearray)):  # a Serve request's encoded image
            from tmr_core.inference import open_image

            try:
                return open_image(uri)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from error
        uri = str(uri)
        if uri not in cache:
            try:
                cache[uri] = load_image(uri, self.storage_options)
            except (FileNotFoundError, ValueError) as error:
                if not self.skip_unreadable_images:
                    raise ValueError(f"{where}: {error}") from error
                cache[uri] = None
        return cache[uri]

    def _region_crops(self, image, regions: list, limit: int) -> list:
        """The top ``limit`` region crops; the whole image when none is usable (``whole_image_region``)."""
        if image is None or not limit:
            return []
        crops = crop_regions(image, regions, limit)
        return crops or ([image] if self.config.whole_image_region else [])

    def _pixel_key(self, uri: Any, regions: list, limit: int, error: Any) -> tuple | None:
        """What a row's processed pixels depend on; None when they are not worth keeping."""
        if not self.pixel_cache_bytes or not isinstance(uri, str) or not uri or error:
            return None
        # every region with its score: crop_regions ranks them all and skips empty boxes
        boxes = tuple((tuple(float(v) for v in r.get("box") or ()), float(r.get("score") or 0.0))
                      for r in regions if isinstance(r, Mapping))
        return uri, boxes, limit

    def _row_pixels(self, rows: Sequence[Mapping], uri_key: str, regions_key: str, where: list[str],
                    limit: int) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
        """Per row: the processed image (None without one) and its processed crops (k, C, H, W);
        the rows not in the pixel cache go through the processor in one call (rows with the same
        key, e.g. an RE sentence's pairs, once)."""
        found: list = [None] * len(rows)
        pending = []  # (row indices, cache key, image, crops)
        pending_keys: dict[tuple, list[int]] = {}
        loaded: dict = {}
        for i, (row, label) in enumerate(zip(rows, where, strict=True)):
            regions = _listed(row.get(regions_key))
            key = self._pixel_key(row.get(uri_key), regions, limit, row.get(ERROR_COLUMNS[uri_key]))
            cached = self._pixels.get(key) if key is not None else None
            if cached is not None:
                found[i] = cached
                continue
            if key is not None and key in pending_keys:
                pending_keys[key].append(i)
                continue
            image = self._load(row.get(uri_key), f"{label}: {uri_key}", loaded, row.get(ERROR_COLUMNS[uri_key]))
            pending.append(([i], key, image, self._region_crops(image, regions, limit)))
            if key is not None:
                pending_keys[key] = pending[-1][0]
        flat = [image for _, _, image, _ in pending if image is not None] + [c for *_, crops in pending for c in crops]
        processed = self._process(flat) if flat else torch.zeros(0, *self.pixel_shape)
        image_cursor, crop_cursor = 0, sum(image is not None for _, _, image, _ in pending)
        for indices, key, image, crops in pending:
            pixels = None
            if image is not None:
                pixels, image_cursor = processed[image_cursor], image_cursor + 1
            crop_pixels = processed[crop_cursor:crop_cursor + len(crops)]
            crop_cursor += len(crops)
            for i in indices:
                found[i] = (pixels, crop_pixels)
            if key is not None:  # copies: a view would keep the whole batch's tensor alive
                self._pixels.put(key, (None if pixels is None else pixels.clone(), crop_pixels.clone()))
        return found

    def images(
        self, rows: Sequence[Mapping], uri_key: str, regions_key: str, where: list[str]
    ) -> dict[str, torch.Tensor]:
        """Pixels of each row's image and region crops, with masks; one processor call per batch
        for the rows not in the pixel cache.

        Without the coarse level (``use_coarse=False``) no crops are made and no region keys returned.
        """
        with_regions = self.config.use_coarse
        limit = self.config.num_regions if with_regions else 0
        per_row = self._row_pixels(rows, uri_key, regions_key, where, limit)
        batch = len(rows)
        pixels = torch.zeros(batch, *self.pixel_shape)
        image_mask = torch.tensor([image is not None for image, _ in per_row], dtype=torch.bool)
        region_pixels = torch.zeros(batch, limit, *self.pixel_shape)
        region_mask = torch.zeros(batch, limit, dtype=torch.bool)
        for i, (image, crops) in enumerate(per_row):
            if image is not None:
                pixels[i] = image
            region_pixels[i, :len(crops)] = crops
            region_mask[i, :len(crops)] = True
        images = {"pixel_values": pixels, "image_mask": image_mask}
        if with_regions:
            images.update(region_pixel_values=region_pixels, region_mask=region_mask)
        return images

    # ----- the batch ------------------------------------------------------------------------

    def __call__(self, rows: Sequence[Mapping] | Mapping[str, Sequence]) -> dict[str, torch.Tensor]:
        rows = _as_rows(rows)
        if not rows:
            raise ValueError("rows: empty batch")
        config = self.config
        where = [f"row {i} (id {row.get('id', '?')})" for i, row in enumerate(rows)]
        encoded = [self.encode_text(row, label) for row, label in zip(rows, where, strict=True)]
        length = max(len(e.input_ids) for e in encoded)
        words = max(len(e.word_starts) for e in encoded)
        phrases = max(1, max(len(e.phrase_spans) for e in encoded))
        batch_size = len(rows)

        input_ids = torch.full((batch_size, length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(batch_size, length, dtype=torch.long)
        word_starts = torch.zeros(batch_size, words, dtype=torch.long)
        word_mask = torch.zeros(batch_size, words, dtype=torch.bool)
        phrase_spans = torch.zeros(batch_size, phrases, 2, dtype=torch.long)
        phrase_mask = torch.zeros(batch_size, phrases, dtype=torch.bool)
        for i, e in enumerate(encoded):
            input_ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
            attention_mask[i, : len(e.input_ids)] = 1
            starts = torch.tensor(e.word_starts)
            word_starts[i, : len(starts)] = starts.clamp(min=0)
            word_mask[i, : len(starts)] = starts >= 0
            if e.phrase_spans:
                phrase_spans[i, : len(e.phrase_spans)] = torch.tensor(e.phrase_spans)
                phrase_mask[i, : len(e.phrase_spans)] = True
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "word_starts": word_starts,
            "word_mask": word_mask,
            "num_tokens": torch.tensor([len(e.word_starts) for e in encoded]),
            "phrase_spans": phrase_spans,
            "phrase_mask": phrase_mask,
        }

        if config.task == "ner":
            if all(row.get("tags") is not None for row in rows):
                labels = torch.full((batch_size, words), IGNORE_INDEX, dtype=torch.long)
                for i, (row, e, label) in enumerate(zip(rows, encoded, where, strict=True)):
                    labels[i, : len(e.word_starts)] = torch.tensor(self.ner_labels(row, e.word_starts, label))
                batch["labels"] = labels
        else:
            batch["entity_positions"] = torch.tensor([e.entity_positions for e in encoded], dtype=torch.long)
            if all(row.get("relation") is not None for row in rows):
                batch["labels"] = torch.tensor(
                    [self.relation_id(row, label) for row, label in zip(rows, where, strict=True)]
                )

        if config.uses_images:
            batch.update(self.images(rows, "image_uri", "regions", where))
            if config.use_back_translation:
                back = self.images(rows, "back_translation_uri", "back_translation_regions", where)
                batch.update({f"bt_{key}": value for key, value in back.items()})
            if config.use_mde:
                batch["divergence"] = self.divergence(rows, where, "divergence", batch["image_mask"])
                if config.use_back_translation and config.back_translation_alpha == "back_translation":
                    batch["bt_divergence"] = self.divergence(
                        rows, where, "back_translation_divergence", batch["bt_image_mask"]
                    )
        return batch

    def relation_id(self, row: Mapping, where: str) -> int:
        relation = str(row["relation"])
        if relation not in self.label_ids:
            raise ValueError(f"{where}: relation {relation!r} is not one of the {len(self.label_ids)} labels")
        return self.label_ids[relation]

    @staticmethod
    def divergence(
        rows: Sequence[Mapping], where: list[str], column: str, image_mask: torch.Tensor
    ) -> torch.Tensor:
        """(batch, 3) MDE scores from ``column``; a row without a usable image may have none
        (score_divergence keeps it with a null score) and gets :data:`NO_IMAGE_ALPHA`."""
        values = []
        for row, label, has_image in zip(rows, where, image_mask.tolist(), strict=True):
            scores = _listed(row.get(column))
            if not scores and not has_image:
                scores = list(NO_IMAGE_ALPHA)
            if len(scores) != 3:
                how = "score_divergence --score_back_translations true" if column != "divergence" else "score_divergence"
                raise ValueError(f"{label}: {column} is {scores!r}; use_mde=True needs 3 scores from {how} "
                                 "(or set use_mde=false)")
            values.append([float(v) for v in scores])
        return torch.tensor(values, dtype=torch.float32)


def _as_rows(batch: Sequence[Mapping] | Mapping[str, Sequence]) -> list[Mapping]:
    """Rows as a list of dicts, from a list of rows or a dict of equal-length columns (Ray Data)."""
    if isinstance(batch, Mapping):
        columns = list(batch)
        size = len(batch[columns[0]]) if columns else 0
        return [{column: batch[column][i] for column in columns} for i in range(size)]
    return list(batch)
