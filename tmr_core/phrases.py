"""Noun phrases from constituency trees: the phrases TMR grounds in the image (paper §3.2).

The paper takes the noun phrases of each sentence (up to 4 tokens for NER, 6 for RE; App. B) and
queries a visual grounding model with them to get the region features V^r of Eq. 2. Real data is
parsed with stanza's constituency parser (:class:`StanzaConstituencyParser`); the synthetic
benchmark ships gold trees in Penn bracketed format, read with stanza's own tree reader
(:func:`read_trees_file`). Both give ``stanza.models.constituency.parse_tree.Tree`` objects, so
:func:`noun_phrases` is the one extraction path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tmr_core.errors import DataFormatError, TMRError

# The paper's noun-phrase limits per task (TMR's code): the training tables' extract_phrases runs,
# the extractor's config, predict and each served task's model use the same one.
PHRASE_LENGTHS = {"ner": 4, "re": 6}

NOUN_PHRASE_LABELS = ("NP",)
STANZA_DOWNLOAD_HINT = (
    "download it once with: python -c \"import stanza; "
    "stanza.download('en', processors='tokenize,pos,constituency')\""
)


@dataclass(frozen=True)
class Phrase:
    """A phrase of a sentence: its text and its token span ``[start, end)``."""

    text: str
    start: int
    end: int


def _is_noun_phrase(label: str) -> bool:
    # Penn trees may carry function tags (NP-SBJ, NP-TMP); they are still noun phrases
    return any(label == base or label.startswith(base + "-") for base in NOUN_PHRASE_LABELS)


def noun_phrases(tree: Any, max_len: int) -> list[Phrase]:
    """Every NP of ``tree`` that spans at most ``max_len`` tokens, deduplicated and sorted by span.

    Args:
        tree: a stanza ``Tree`` whose leaves are the sentence's tokens, in order.
        max_len: the longest phrase kept, in tokens (paper: 4 for NER, 6 for RE).

    Returns:
        Phrases sorted by ``(start, end)``; a span that several nested NPs share (unary chains)
        appears once.

    Raises:
        ValueError: if ``max_len`` < 1.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    leaves: list[str] = []
    spans: set[tuple[int, int]] = set()

    def visit(node: Any) -> None:
        if node.is_leaf():
            leaves.append(node.label)
            return
        start = len(leaves)
        for child in node.children:
            visit(child)
        end = len(leaves)
        if _is_noun_phrase(node.label) and 0 < end - start <= max_len:
            spans.add((start, end))

    visit(tree)
    return [Phrase(" ".join(leaves[s:e]), s, e) for s, e in sorted(spans)]


def read_trees_file(path: str | Path) -> dict[str, Any]:
    """Read ``<id>\\t<Penn bracketed tree>`` lines (the benchmark's ``trees/`` files).

    Returns:
        id -> stanza ``Tree``, in file order.

    Raises:
        DataFormatError: naming ``path:line`` for a line without a TAB, a tree stanza cannot read,
            more than one tree on a line, or an id seen twice.
    """
    from stanza.models.constituency.tree_reader import read_trees

    trees: dict[str, Any] = {}
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            key, tab, text = line.partition("\t")
            if not tab or not key:
                raise DataFormatError(path, line_no, "expected '<id>\\t<bracketed tree>'")
            try:
                parsed = read_trees(text, use_tqdm=False)
            except Exception as exc:  # stanza raises ValueError subclasses with its own line numbers
                raise DataFormatError(path, line_no, f"not a bracketed tree ({type(exc).__name__}: {exc})") from None
            if len(parsed) != 1:
                raise DataFormatError(path, line_no, f"expected exactly one tree, found {len(parsed)}")
            if key in trees:
                raise DataFormatError(path, line_no, f"id {key!r} appears twice")
            trees[key] = parsed[0]
    return trees


class StanzaConstituencyParser:
    """stanza's English constituency parser on pre-tokenized sentences (the path for real data).

    Args:
        model_dir: where stanza's models live (stanza's default, ``$STANZA_RESOURCES_DIR``, when None).
        use_gpu: let stanza use a GPU when one is present.

    Raises:
        TMRError: when the English tokenize/pos/constituency models are not downloaded; the message
            says how to download them. Nothing is downloaded here.
    """

    def __init__(self, model_dir: str | None = None, use_gpu: bool = False):
        import stanza

        kwargs = {"dir": model_dir} if model_dir else {}
        try:
            self.pipeline = stanza.Pipeline(
                lang="en",
                processors="tokenize,pos,constituency",
                tokenize_pretokenized=True,
                download_method=None,  # never reach the network from a job
                use_gpu=use_gpu,
                logging_level="WARN",
                **kwargs,
            )
        except Exception as exc:  # stanza raises several types for missing resources
            where = model_dir or "stanza's default directory ($STANZA_RESOURCES_DIR)"
            raise TMRError(
                f"stanza English constituency models are not available in {where} ({type(exc).__name__}: {exc}); "
                f"{STANZA_DOWNLOAD_HINT}, or give gold trees in Penn bracketed format (read_trees_file)"
            ) from exc

    def parse(self, sentences: list[list[str]]) -> list[Any]:
        """One stanza ``Tree`` per sentence; leaves are the given tokens."""
        if not sentences:
            return []
        for i, tokens in enumerate(sentences):
            if not tokens or any(not t or any(c.isspace() for c in t) for t in tokens):
                raise ValueError(f"sentences[{i}]: tokens must be non-empty strings without whitespace")
        doc = self.pipeline(sentences)
        return [sentence.constituency for sentence in doc.sentences]


_FUNCTION_WORDS = frozenset(
    "a an the this that these those of in on at to for with by from and or but is are was were be been "
    "i you he she it we they me him her us them my your his its our their rt".split()
)


def tiny_noun_phrases(tokens: list[str], max_len: int) -> list[dict]:
    """TINY-MODE PARSER: a parser-free stand-in for stanza's noun phrases, for offline tests and
    the demo only (configs/serve.tiny.yaml). It keeps runs of capitalised words (names, which is
    what grounding mostly needs) and a determiner followed by content words ("the red car"),
    each cut to ``max_len`` words. Real deployments use ``phrase_parser: stanza``.
    """
    spans: set[tuple[int, int]] = set()

    def add_run(start: int, end: int) -> None:
        if end > start:
            spans.add((start, min(end, start + max_len)))

    start = None
    for i, token in enumerate(tokens + [""]):
        capitalised = token[:1].isupper() and token.lower() not in _FUNCTION_WORDS
        if capitalised and start is None:
            start = i
        elif not capitalised and start is not None:
            add_run(start, i)
            start = None
    for i, token in enumerate(tokens):
        if token.lower() in ("a", "an", "the"):
            end = i + 1
            while end < len(tokens) and tokens[end].isalpha() and tokens[end].lower() not in _FUNCTION_WORDS:
                end += 1
            add_run(i, end if end > i + 1 else i)
    return [{"text": " ".join(tokens[s:e]), "start": s, "end": e} for s, e in sorted(spans)]
