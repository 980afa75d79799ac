"""Generate the synthetic multimodal benchmark (NER, RE, MDE corpus) in the real datasets' formats.

    python -m jobs.make_synthetic_benchmark --out outputs/benchmark [--seed 0] [--size tiny|small|paper-like] [--version 1|2]

The image decides what the text leaves open: focus names are ambiguous (PER in one sentence,
LOC or ORG in another), and each sample is strengthen / complement / weaken (paper §1, Fig. 1).
``--version 2`` (the default) draws the deciding object small among distractors, so that the
object the mention names, not the image's colours overall, tells its type; ``--version 1`` keeps
the old world (one large focus glyph) byte for byte. The MDE corpus follows §3.4 (1:1:2, weaken by
swapping images, a style shortcut in domain and an out-of-domain style with both kinds). See :mod:`tmr_core.synthetic` for the world and the layout.
Same seed and config, same bytes. Writes ``stats.json`` (ambiguity, alignment fractions, the
text-only ceiling on ambiguous items) and ``config.yaml`` beside the data.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Literal

from jobs._config import opt, parse_config, print_config, run_main, save_config

JOB = "make_synthetic_benchmark"


@dataclass
class Config:
    """Generate the synthetic benchmark (NER, RE, MDE corpus) into one folder."""

    out: str = opt("outputs/benchmark", "Folder to write (local path); existing files are overwritten.")
    seed: int = opt(0, "Generator seed: same seed and config, same bytes.")
    version: Literal[1, 2] = opt(
        2, "The world: 1 = one large focus glyph whose colour decides the type (kept byte-reproducible); "
        "2 = small glyphs at random positions among distractors, boxes in ground_truth.jsonl."
    )
    size: Literal["tiny", "small", "paper-like"] = opt(
        "tiny", "Preset sizes: tiny (seconds; tests and demo), small, paper-like (the paper's split sizes)."
    )
    ner_sizes: list[int] | None = opt(None, "NER sentences per train,valid,test; null: the preset's.")
    re_sizes: list[int] | None = opt(None, "RE images (2 instances each) per train,valid,test; null: the preset's.")
    mde_sizes: list[int] | None = opt(
        None, "MDE rows per train,valid,test_in_domain,test_out_of_domain (multiples of 4); null: the preset's."
    )
    alignment_fractions: list[float] | None = opt(
        None, "Shares of strengthen,complement,weaken samples (sum 1); null: 0.30,0.45,0.25."
    )
    re_none_prob: float | None = opt(None, "P(relation = None) for an RE focus pair; null: 0.25.")
    image_size: int | None = opt(None, "Image side in pixels; null: 64.")

    def __post_init__(self) -> None:
        self.synthetic_config()  # raises ValueError naming the bad field

    def synthetic_config(self):
        from tmr_core.synthetic import preset

        def as_tuple(values):
            return tuple(values) if values is not None else None

        return preset(
            self.size,
            seed=self.seed,
            version=self.version,
            ner_sizes=as_tuple(self.ner_sizes),
            re_sizes=as_tuple(self.re_sizes),
            mde_sizes=as_tuple(self.mde_sizes),
            alignment_fractions=as_tuple(self.alignment_fractions),
            re_none_prob=self.re_none_prob,
            image_size=self.image_size,
        )


def print_summary(stats: dict) -> None:
    for task in ("ner", "re"):
        if task not in stats:
            continue
        s = stats[task]
        fractions = ", ".join(f"{k} {v:.2f}" for k, v in s["alignment_fractions"].items())
        line = f"[{JOB}] {task}: {s['samples']} samples; ambiguous {s['ambiguous_share']:.1%}; {fractions}"
        if "text_only_ceiling_test" in s:
            line += (f"; best text-only model on the ambiguous test items: {s['text_only_f1_test']:.1%} F1 "
                     f"(the ambiguous-subset metric; expected accuracy {s['text_only_ceiling_test']:.1%})")
        print(line)
    if "world" in stats:
        w = stats["world"]
        print(f"[{JOB}] world v{w['version']}: the largest type colour is the focus type on "
              f"{w['histogram_rule_accuracy']:.1%} of {w['items']} {w['split']} images that show it "
              f"(focus glyph: median {w['median_focus_area_share']:.1%} of the pixels); weaken share "
              f"{json.dumps(w['weaken_share'])}")
    for split, entry in stats.get("mde", {}).items():
        print(f"[{JOB}] mde {split}: {entry['rows']} rows {json.dumps(entry['labels'])}")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(Config, argv, prog=f"jobs.{JOB}")
    print_config(cfg, JOB)
    from tmr_core.synthetic import generate_benchmark, write_benchmark

    start = time.perf_counter()
    stats = write_benchmark(generate_benchmark(cfg.synthetic_config()), cfg.out)
    save_config(cfg, cfg.out)
    print_summary(stats)
    print(f"[{JOB}] wrote {cfg.out} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    run_main(main)
