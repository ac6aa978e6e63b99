"""`mlip info [CHECKPOINT]`: the shipped potentials, or one checkpoint's model card, config and metadata."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", nargs="?", help="a .safetensors file or a shipped potential's name (default: list them)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    from .checkpoint import Checkpoint, shipped_checkpoints

    if args.checkpoint is None:
        return list_shipped(shipped_checkpoints(), args.json)
    ckpt = Checkpoint(args.checkpoint)
    card = ckpt.card_path().read_text() if ckpt.card_path().is_file() else None
    summary = {
        "path": str(ckpt.path),
        "sha256": ckpt.sha256,
        "code_version": ckpt.code_version,
        "dtype": ckpt.dtype,
        "num_parameters": sum(p.numel() for p in ckpt.build_model().parameters()),
        "config": ckpt.config.to_dict(),
        "metadata": ckpt.metadata,
    }
    if args.json:
        print(json.dumps({**summary, "model_card": card}))
        return 0
    if card:
        print(card.rstrip(), end="\n\n")
    else:
        print(f"(no model card at {ckpt.card_path()})\n")
    print(json.dumps(summary, indent=2))
    return 0


def list_shipped(shipped: dict, as_json: bool) -> int:
    """Name, elements, SHA-256 and file of every shipped potential."""
    from .checkpoint import Checkpoint

    rows = []
    for name, path in shipped.items():
        ckpt = Checkpoint(path)
        rows.append({"name": name, "species": ckpt.config.species, "sha256": ckpt.sha256, "path": str(path)})
    if as_json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print("no shipped potentials found (pass a checkpoint file)")
    for row in rows:
        print(f"{row['name']:<16} Z={row['species']}  sha256 {row['sha256'][:12]}  {row['path']}")
    return 0
