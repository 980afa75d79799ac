"""Extract the noun phrases T^p of every sentence from a constituency parse (TMR §3.2).

    python -m jobs.extract_phrases --config configs/extract_phrases.yaml \\
        --input outputs/dataset --output outputs/phrases --max_phrase_len 6

The paper parses with the Stanford parser following UMGF and keeps noun phrases of at most 4
tokens (NER) or 6 (RE). ``--parser stanza`` runs a ``stanza.Pipeline`` (English, pretokenized,
constituency) created once per actor; ``--parser trees`` reads gold bracketed trees keyed by
image id (``--trees_dir BENCH/trees/ner`` holding ``<split>.txt``), which works offline.
Adds ``phrases`` (list of {text, start, end}, token offsets, end exclusive).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from jobs._common import StorageConfig
from jobs._config import opt, parse_config, print_config, run_main, save_config
from jobs._data import (
    ComputeConfig,
    actor_pool_args,
    add_columns,
    fingerprint,
    init_ray,
    is_up_to_date,
    present_splits,
    read_splits,
    write_splits,
    write_success_marker,
)

JOB = "extract_phrases"


@dataclass
class Config:
    """Noun phrases from a constituency parse of each sentence."""

    input: str = opt("outputs/dataset", "Dataset folder (local or s3://) with <split>.parquet or <split>/.")
    output: str = opt("outputs/phrases", "Dataset folder to write <split>/, config.yaml, _SUCCESS.json.")
    splits: list[str] = opt(["train", "valid", "test"], "Splits to process (those present are read).")
    force: bool = opt(False, "Run even when the output's _SUCCESS.json matches this config and input.")
    parser: Literal["stanza", "trees", "tiny"] = opt(
        "stanza", "stanza: parse with stanza; trees: read gold trees; tiny: the offline heuristic Serve's tiny "
        "config uses (capitalised runs and determiner phrases; no parser model, for laptops without stanza's)."
    )
    trees_dir: str | None = opt(None, "parser=trees: local folder of <split>.txt lines '<image id or id>\\t<tree>'.")
    max_phrase_len: int = opt(4, "Longest noun phrase kept, in tokens (paper: 4 for NER, 6 for RE).")
    stanza_dir: str | None = opt(None, "parser=stanza: folder of downloaded stanza models (null: stanza's default).")
    use_gpu: bool = opt(False, "parser=stanza: let stanza use a GPU (set compute.num_gpus too).")
    compute: ComputeConfig = opt(ComputeConfig, "Actor pool and batch size.")
    storage: StorageConfig = opt(StorageConfig, "Where s3:// URIs are served.")

    def __post_init__(self) -> None:
        problems = []
        if self.parser == "trees" and not self.trees_dir:
            problems.append("--parser trees needs --trees_dir (a folder of <split>.txt tree files)")
        if self.max_phrase_len < 1:
            problems.append(f"max_phrase_len: must be ≥ 1, got {self.max_phrase_len}")
        if problems:
            raise ValueError("; ".join(problems))


class ExtractPhrases:
    """Ray Data callable: rows in, rows plus ``phrases`` out. The parser
    (:class:`tmr_core.inference.PhraseStep`, as jobs.predict and Serve parse) or the tree files
    are loaded once per actor."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._trees: dict[str, dict] = {}  # split -> image_id -> tree, read on first use
        self._step = None
        if cfg.parser in ("stanza", "tiny"):
            from tmr_core.inference import PhraseStep

            self._step = PhraseStep(cfg.parser, cfg.max_phrase_len, cfg.stanza_dir, use_gpu=cfg.use_gpu)

    def _gold_tree(self, split: str, image_id: str, sample_id: str) -> Any:
        import os

        from tmr_core.phrases import read_trees_file

        if split not in self._trees:
            path = os.path.join(self.cfg.trees_dir, f"{split}.txt")
            self._trees[split] = read_trees_file(path)
        # RE tree files are keyed by image id (one sentence, many entity pairs), NER ones by sample id
        tree = self._trees[split].get(image_id, self._trees[split].get(sample_id))
        if tree is None:
            raise KeyError(f"{self.cfg.trees_dir}/{split}.txt: no tree for image id {image_id!r} or id {sample_id!r}")
        return tree

    def __call__(self, batch: Any) -> Any:
        from tmr_core.phrases import noun_phrases

        if self._step is not None:
            phrases = self._step.phrases(batch.column("tokens").to_pylist())
        else:
            keys = zip(*(batch.column(c).to_pylist() for c in ("split", "image_id", "id")), strict=True)
            trees = [self._gold_tree(split, image_id, sample_id) for split, image_id, sample_id in keys]
            phrases = [[{"text": p.text, "start": p.start, "end": p.end}
                        for p in noun_phrases(tree, self.cfg.max_phrase_len)] for tree in trees]
        return add_columns(batch, JOB, {
            "phrases": phrases,
            "_stat_phrases": [len(p) for p in phrases],
            "_stat_rows_without_phrases": [int(not p) for p in phrases],
        })


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(Config, argv, prog=f"jobs.{JOB}")
    print_config(cfg, JOB)
    options = cfg.storage.options()
    splits = present_splits(cfg.input, cfg.splits, options, output=cfg.output)
    stage_fingerprint = fingerprint(JOB, cfg, cfg.input, splits, options)
    if not cfg.force and is_up_to_date(cfg.output, stage_fingerprint, options):
        print(f"[{JOB}] {cfg.output} is up to date (same config and input); nothing to do. --force true reruns it.")
        return 0

    init_ray()
    start = time.perf_counter()
    ds = read_splits(cfg.input, splits, options, rows_per_block=cfg.compute.batch_size).map_batches(
        ExtractPhrases, fn_constructor_kwargs={"cfg": cfg}, **actor_pool_args(cfg.compute, cfg.input, cfg.output)
    )
    rows, stats = write_splits(ds, cfg.output, splits, options)
    summary = {**stats, "seconds": round(time.perf_counter() - start, 3)}
    save_config(cfg, cfg.output, options=options)
    write_success_marker(cfg.output, rows, stage_fingerprint, summary, options)
    print(
        f"[{JOB}] rows {rows} | phrases {stats.get('phrases', 0)} | "
        f"rows without phrases {stats.get('rows_without_phrases', 0)} | {summary['seconds']:.1f}s"
    )
    return 0


if __name__ == "__main__":
    run_main(main)
