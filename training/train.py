"""`mlip train CONFIG.yaml`: train a potential; flags override YAML keys."""

from __future__ import annotations

import argparse
import shlex
import sys

FLAG_KEYS = (
    "train_file", "valid_file", "output", "init_from", "max_epochs", "max_time", "batch_size", "lr", "device", "dtype", "seed",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training config (YAML); see training/configs/")
    parser.add_argument("--train-file")
    parser.add_argument("--valid-file")
    parser.add_argument("--output", help="checkpoint path (.safetensors); logs and plots go beside it")
    parser.add_argument(
        "--init-from", metavar="CHECKPOINT",
        help="fine-tune: start from this checkpoint's weights (a file or a shipped name such as aspirin-rmd17)",
    )
    parser.add_argument("--max-epochs", type=int)
    parser.add_argument("--max-time", help="wall-time budget: seconds, or like 45m / 2h")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", choices=["float32", "float64"])
    parser.add_argument("--seed", type=int)
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT.train-state.pt")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override any config key (YAML value), e.g. --set forces_weight=100 --set model.num_channels=32",
    )


def overrides_from_args(args: argparse.Namespace) -> dict:
    """Explicit flags and --set KEY=VALUE pairs as a config dict (model.X keys nest)."""
    import yaml

    overrides: dict = {k: getattr(args, k) for k in FLAG_KEYS if getattr(args, k) is not None}
    if args.resume:
        overrides["resume"] = True
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        parsed = yaml.safe_load(value)
        if key.startswith("model."):
            overrides.setdefault("model", {})[key.removeprefix("model.")] = parsed
        else:
            overrides[key] = parsed
    return overrides


def run(args: argparse.Namespace) -> int:
    import yaml

    from .config import TrainConfig
    from .distributed import launched_world_size
    from .trainer import Trainer

    overrides = overrides_from_args(args)
    model_overrides = overrides.pop("model", {})
    config = TrainConfig.from_yaml(args.config, overrides)
    config.model.update(model_overrides)
    config.__post_init__()
    world_size = launched_world_size()
    launcher = f"torchrun --standalone --nproc_per_node={world_size} -m mlip.cli" if world_size > 1 else "mlip"
    config.command = f"{launcher} train " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    result = Trainer(config).run()
    if result:
        print(yaml.safe_dump({"validation": result["validation"]}, sort_keys=False))
    return 0
