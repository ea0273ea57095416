"""Decoding speed of two checkouts, interleaved: `trimode bench` on each, alternately, several rounds.

    python scripts/compare_revisions.py OLD_CHECKOUT NEW_CHECKOUT [--rounds 3] [-- bench flags...]

Each round runs `python -m trimode.cli bench --json ...` once with OLD's package first on the path
and once with NEW's (the order alternates between rounds, so drift in machine load hits both), keeps
each configuration's fastest tokens/s per checkout, and prints per configuration: tokens/s of both,
the ratio NEW / OLD, and whether NFE and a hash of what the outputs decide (token counts, per-forward
histograms, agreement with AR) agree. Used for the decoder refactor's
"speed unchanged" check (docs/dev/refactor-2026-12.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys


def bench(checkout: str, flags: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(checkout), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "trimode.cli", "bench", "--json", *flags], env=env,
                         capture_output=True, text=True, check=True, cwd=os.path.abspath(checkout))
    return json.loads(out.stdout.strip().splitlines()[-1])


def configs(res: dict) -> dict[str, dict]:
    out = {}
    for r in res["runs"]:
        # The bench reports no token lists; what the outputs decide: lengths, per-forward histograms,
        # agreement with AR (a changed token changes the AR comparison or the histograms).
        seen = {k: r.get(k) for k in ("tokens", "step_hist", "acceptance_hist", "identical_to_ar",
                                      "agreement_with_ar", "finish")}
        out[r["config"]] = {"tps": r["tokens_per_s"], "nfe": r["nfe"],
                            "hash": hashlib.sha256(json.dumps(seen, sort_keys=True).encode()).hexdigest()[:12]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--rounds", type=int, default=3)
    args, flags = p.parse_known_args(argv)
    flags = [f for f in flags if f != "--"]
    best: dict[str, dict[str, dict]] = {"old": {}, "new": {}}
    for rnd in range(args.rounds):
        order = ("old", "new") if rnd % 2 == 0 else ("new", "old")
        for which in order:
            for label, c in configs(bench(getattr(args, which), flags)).items():
                prev = best[which].get(label)
                if prev is None or c["tps"] > prev["tps"]:
                    best[which][label] = c
        print(f"round {rnd + 1}/{args.rounds} done (load average {os.getloadavg()[0]:.2f})", file=sys.stderr)
    print(f"{'configuration':<28} {'old tok/s':>9} {'new tok/s':>9} {'new/old':>7}  same NFE  same outputs")
    for label, o in best["old"].items():
        n = best["new"].get(label)
        if n is None:
            print(f"{label:<28} {o['tps']:>9.1f} {'-':>9}")
            continue
        print(f"{label:<28} {o['tps']:>9.1f} {n['tps']:>9.1f} {n['tps'] / o['tps']:>6.3f}x  "
              f"{str(o['nfe'] == n['nfe']):<8}  {o['hash'] == n['hash']}")
    print(json.dumps(best))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
