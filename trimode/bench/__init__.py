"""Benchmarks: one metric for every mode, the speed-of-light oracle, peers side by side, roofline.

`trimode bench` (see `trimode.bench.cli`). Modules:

- suites.py     prompt suites by category (coding, math, the model's own domain), chat-formatted
- timing.py     TimedModel: a proxy that times every forward and counts NFE independently
- runner.py     run one (mode, block_len, threshold) over a suite; metrics identical for every mode
- oracle.py     speed-of-light: diffusion with the oracle unmasking policy (AR greedy as reference)
- peers.py      transformers `generate` (greedy, prompt lookup) on the same weights
- roofline.py   machine matmul rate and memory bandwidth; FLOPs and bytes per forward
- synthetic.py  NLD-8B-shaped random model: time each forward kind, project tokens/s
- sweep.py      batch-size sweep, the ar / speculative crossover, serving.json
- plots.py      PNG plots (matplotlib, optional extra)
"""
