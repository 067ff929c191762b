"""Benchmark infrastructure: result CSVs, timing helpers, physical floors, the report and the CLI.

- ``results``: the CSV schema of ``bench/results/<device>.csv`` (append-only) and the run environment.
- ``timing``: CPU / CUDA timing, input rotation, quantiles.
- ``floors``: matmul peak and copy bandwidth of a device, measured in the same run as the kernels.
- ``report``: Markdown table and PNG plots from the CSV (``dare-kernels report``).
- ``cli``: ``dare-kernels bench`` and ``dare-kernels report``.
- ``catalog``: the one table of model shapes (``shapes``), peers / baselines (``peers``), tolerances against
  the float64 reference (``tolerances``) and declared backend limits (``capabilities``) that bench/, tests/
  and the GPU self-check share.
"""
