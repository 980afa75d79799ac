"""Keep the RayService's ``serveConfigV2`` identical to ``configs/serve.yaml``.

KubeRay takes the Serve config as a string inside the RayService manifest, so the file `serve run`
uses and the manifest would drift apart if edited by hand. This copies the config's text (comments
included) into the ``serveConfigV2: |`` block, leaving the rest of the manifest untouched.

    python cluster/sync_serve_config.py           # rewrite cluster/kuberay/rayservice.yaml
    python cluster/sync_serve_config.py --check   # exit 1 if they differ (tests compare parsed YAML)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVE_CONFIG = REPO / "configs" / "serve.yaml"
RAYSERVICE = REPO / "cluster" / "kuberay" / "rayservice.yaml"
KEY = "serveConfigV2: |"


def embed(manifest: str, serve_config: str) -> str:
    """``manifest`` with the block scalar after ``serveConfigV2: |`` replaced by ``serve_config``.

    The block is every following line that is blank or indented deeper than the key.
    """
    lines = manifest.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == KEY]
    if len(starts) != 1:
        raise SystemExit(f"{RAYSERVICE}: expected exactly one '{KEY}' line, found {len(starts)}")
    start = starts[0]
    key_indent = len(lines[start]) - len(lines[start].lstrip())
    end = start + 1
    while end < len(lines) and (
        not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > key_indent
    ):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():  # keep blank lines after the block
        end -= 1
    pad = " " * (key_indent + 2)
    block = [pad + line if line.strip() else "" for line in serve_config.rstrip("\n").splitlines()]
    return "\n".join(lines[: start + 1] + block + lines[end:]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether they differ")
    args = parser.parse_args(argv)
    current = RAYSERVICE.read_text()
    wanted = embed(current, SERVE_CONFIG.read_text())
    if current == wanted:
        print(f"{RAYSERVICE.relative_to(REPO)} embeds {SERVE_CONFIG.relative_to(REPO)}")
        return 0
    if args.check:
        print(
            f"{RAYSERVICE.relative_to(REPO)} differs from {SERVE_CONFIG.relative_to(REPO)}: "
            "run python cluster/sync_serve_config.py",
            file=sys.stderr,
        )
        return 1
    RAYSERVICE.write_text(wanted)
    print(f"updated {RAYSERVICE.relative_to(REPO)} from {SERVE_CONFIG.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
