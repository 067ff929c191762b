"""Benchmark infrastructure: result CSVs, timing helpers, physical floors, the report and the CLI.

- ``results``: the CSV schema of ``bench/results/<device>.csv`` (append-only) and the run environment.
- ``timing``: CPU / CUDA timing, input rotation, quantiles.
- ``floors``: matmul peak and copy bandwidth of a device, measured in the same run as the kernels.
- ``report``: Markdown table and PNG plots from the CSV (``dare-kernels report``).
- ``cli``: ``dare-kernels bench`` and ``dare-kernels report``.
- the catalog bench/, tests/ and the GPU self-check share: ``shapes`` (model attention and latent shapes),
  ``peers`` (SDPA / FlexAttention / eager / diffusers-guider baselines and the SRA bias), ``tolerances``
  (per-dtype tolerances against the float64 reference and the one comparison) and ``capabilities`` (what a
  backend declares unsupported).
"""
