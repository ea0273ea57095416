"""llama.cpp as a peer (`llama-cpp-python`, never a dependency): plain greedy decoding and its
prompt-lookup speculative decoding, on the GGUF our model was converted from, at batch 1, with the
same prompt token ids (the converted tokenizer is the GGUF's vocabulary, so ids are shared).

Building it here: a default (native) build dies with SIGILL on these VMs, which report AVX-512 / AMX
the hypervisor does not allow; this works (about 15-20 minutes on 2 cores):

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF" \\
        pip install llama-cpp-python==0.3.36
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from .peers import PeerResult
from .suites import Prompt

INSTALL = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF" '
           "pip install llama-cpp-python==0.3.36")


def source_gguf(model_dir: Path | None) -> Path | None:
    """The GGUF a `trimode convert` directory came from (CONVERTED_FROM.json), when it still exists."""
    if model_dir is None:
        return None
    try:
        g = Path(json.loads((Path(model_dir) / "CONVERTED_FROM.json").read_text())["gguf"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return g if g.is_file() else None


def resolve(choice: str, model_dir: Path | None) -> tuple[Path | None, str]:
    """(GGUF to run, why not when None) for `--llama-cpp auto|off|FILE`."""
    if choice == "off":
        return None, "off (--llama-cpp off)"
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return None, f"llama-cpp-python not installed ({e}); to compare with llama.cpp: {INSTALL}"
    if choice != "auto":
        g = Path(choice)
        if not g.is_file():
            raise ValueError(f"--llama-cpp {choice}: no such GGUF file")
        return g, str(g)
    g = source_gguf(model_dir)
    if g is None:
        return None, "the model was not converted from a GGUF (no CONVERTED_FROM.json); pass --llama-cpp FILE.gguf"
    return g, str(g)


class LlamaCppPeer:
    """One loaded llama.cpp model (two, with prompt lookup: the draft is a constructor argument)."""

    def __init__(self, gguf: Path, *, n_ctx: int, threads: int, lookup: int | None) -> None:
        import llama_cpp

        draft = None
        if lookup:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            draft = LlamaPromptLookupDecoding(num_pred_tokens=lookup)
        self.name = f"llama.cpp prompt-lookup {lookup}" if lookup else "llama.cpp"
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   n_batch=512, draft_model=draft, verbose=False)

    def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int, eos_id: int | None,
                 stop: Sequence[int] = ()) -> PeerResult:
        outs: dict[str, list[int]] = {}
        per: dict[str, float] = {}
        ends = set(stop) | ({eos_id} if eos_id is not None else set())
        for p in prompts:
            t0 = time.perf_counter()
            toks: list[int] = []
            for t in self.llm.generate(list(p.tokens), top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                       repeat_penalty=1.0, reset=True):
                if t in ends:
                    break
                toks.append(int(t))
                if len(toks) >= max_new_tokens:
                    break
            per[p.source] = time.perf_counter() - t0
            outs[p.source] = toks
        total = sum(len(v) for v in outs.values())
        return PeerResult(self.name, total, sum(per.values()), outs, per, 0)
