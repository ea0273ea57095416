"""How much of trimode runs between `generate(mode=...)` and the first model forward: the distinct
source lines executed (and the files they are in), counted with sys.settrace on the bundled model.

    PYTHONPATH=CHECKOUT python scripts/lines_to_first_forward.py [--mode linear]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


class FirstForward(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", default="linear")
    args = p.parse_args(argv)
    import trimode
    from trimode.checkpoint import load_model
    from trimode.decode import generate
    from trimode.model import Transformer

    root = Path(trimode.__file__).parent
    model = load_model(root / "assets" / "bundled")
    seen: set[tuple[str, int]] = set()

    def tracer(frame, event, arg):
        f = frame.f_code.co_filename
        if not f.startswith(str(root)) or "/model.py" in f or "/masks.py" in f or "/cache.py" in f:
            return tracer
        if event == "line":
            seen.add((f, frame.f_lineno))
        return tracer

    real = Transformer.forward

    def stop(self, *a, **k):
        raise FirstForward

    Transformer.forward = stop
    sys.settrace(tracer)
    try:
        generate(model, [[1, 2, 3]], mode=args.mode, max_new_tokens=8, block_len=4)
    except FirstForward:
        pass
    finally:
        sys.settrace(None)
        Transformer.forward = real
    files = sorted({Path(f).relative_to(root.parent).as_posix() for f, _ in seen})
    print(f"{args.mode}: {len(seen)} distinct lines in {len(files)} files before the first forward: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
