"""The benchmark table of the device check (tools/gpu_check_bench.py), in small modules.

    plan.py            which rows run, in which order (peers of a mode before its dare rows), per part
    attention.py       SRA attention inputs and providers (dare, SDPA variants, FlexAttention, eager maps)
    cfg_rows.py        rectified_cfg providers (dare, eager formula, diffusers' guider, copy floor)
    diffusers_rows.py  one real-size diffusers attention layer: stock processor vs the DARE processor
    table.py           timing, peak memory, the row files and the ratio summary (bench.json / .csv / .md)

Nothing here imports pytest; the module names are imported as ``gpucheck.<module>`` with bench/ on sys.path.
"""
