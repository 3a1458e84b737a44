"""Report: what the run did, for the user and for the hub.

Takes the plan, per-layer statistics, verification and validation; gives `mla_report.json`, the tables
the CLI prints, the model card (README.md) and the plots. Open `report.py` first.
"""
