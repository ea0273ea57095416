"""`trimode train --config FILE.toml|json [--key value ...]`."""

from __future__ import annotations

import sys

USAGE = """usage: trimode train [--config FILE.toml|FILE.json] [--key value ...]

Every TrainConfig field can be given as --key value (e.g. --steps 500 --lr 3e-4 --data DIR1,DIR2).
--resume continues the run in --out_dir from its latest checkpoint; --init DIR starts from a
native checkpoint (e.g. one written by `trimode convert`). --list-keys prints the fields.

SIGTERM or Ctrl-C stops the run after the current step with a checkpoint ("stopped by SIGTERM at
step N; resume with --resume") and exit status 0; a second Ctrl-C stops at once (exit 130).
Errors are one line on stderr: exit 2 for bad input (config, data, an unwritable --out_dir),
1 for a failed write during the run (a full disk, a file made unwritable).
"""


def main(argv: list[str] | None = None) -> int:
    from .config import TrainConfig, build_config, parse_overrides

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv and argv[0] == "--list-keys":
        for k, v in TrainConfig().to_dict().items():
            print(f"{k} = {v!r}")
        return 0
    file = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv):
            file, i = argv[i + 1], i + 2
        elif argv[i].startswith("--config="):
            file, i = argv[i].split("=", 1)[1], i + 1
        else:
            rest.append(argv[i])
            i += 1
    try:
        cfg = build_config(file, parse_overrides(rest))
        from .._io import os_error_message
        from .checkpointing import CheckpointError
        from .loop import train

        try:
            last = train(cfg)
        except CheckpointError as e:
            print(f"trimode train: error: {e}", file=sys.stderr)
            return 1
        except OSError as e:  # a write (log, dataset cache, ...) the up-front check could not foresee
            print(f"trimode train: error: {os_error_message(e)}", file=sys.stderr)
            return 1
    except ValueError as e:
        print(f"trimode train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("trimode train: interrupted (checkpoint written; continue with --resume)", file=sys.stderr)
        return 130
    if last:  # rank 0 only: the other ranks of a torchrun get {}
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in last.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
