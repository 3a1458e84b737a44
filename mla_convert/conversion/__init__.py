"""Calibrate and convert: source layers in, DeepSeek-V3 attention tensors out.

Takes a `Source`, a `Plan` and calibration windows; gives the converted tensors layer by layer (to a
writer's `add`) and per-layer statistics. `driver.py` applies the math in `mla/`; with calibration text,
`calibrator.py` feeds it statistics from the already converted layers and refits each layer (`query_refit.py`,
`reconstruct.py`); `budget.py` measures how to split a KV budget. Open `driver.py` first.
"""
