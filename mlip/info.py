"""`mlip info CHECKPOINT`: print the model card, config and metadata of a checkpoint."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="path to a .safetensors checkpoint")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    from .checkpoint import Checkpoint

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
