"""`mlip serve`: serve checkpoints over HTTP and WebSocket (settings also from MLIP_* variables)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", type=Path, help="serve this checkpoint: a file or a shipped name (default: every shipped one)")
    source.add_argument("--models", type=Path, help="serve every *.safetensors in this directory")
    parser.add_argument("--default-model", help="model used when a request names none")
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (default 8000)")
    parser.add_argument("--device", help="auto (GPU if there is one), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=["float32", "float64"], help="evaluation precision (default float64)")
    parser.add_argument("--torch-threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--compile", action="store_true", default=None,
        help="torch.compile the model (lower per-call overhead: 1.3x on aspirin float32, 2 CPU threads; warm-up takes minutes)",
    )
    parser.add_argument(
        "--kernels",  # checked by Settings (mlip.kernels.KERNELS), so that `mlip --help` does not import torch
        help="equivariant kernels: e3nn (default) or cueq (cuEquivariance, pip install 'mlip-service[cuda]')",
    )
    parser.add_argument(
        "--cuda-graphs", action="store_true", default=None,
        help="on a GPU, replay captured CUDA graphs for small batches (one per padded size; ignored on a CPU)",
    )
    parser.add_argument("--max-batch-atoms", type=int, help="atom budget of one micro-batch (default 4096)")
    parser.add_argument("--max-wait-ms", type=float, help="wait to gather larger batches, ms (default 0)")
    parser.add_argument(
        "--session-wait-ms", type=float,
        help="wait for open WebSocket sessions' next steps to join a batch, ms (default 3 on a GPU, 0 on a CPU; "
             "at most half the last batch's time)",
    )
    parser.add_argument("--max-queue", type=int, help="structures waiting per model before 503 (default 1024)")
    parser.add_argument("--log-level", help="uvicorn log level (default info)")


def run(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from .app import create_app
    from .settings import Settings

    try:
        settings = Settings(**{k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None})
    except ValidationError as err:
        raise ValueError(str(err)) from err
    settings.checkpoint_paths()  # fail now, not after uvicorn started, if there is nothing to serve
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        ws_per_message_deflate=False,
        ws_max_size=settings.max_body_bytes,
    )
    return 0
