"""Write: files on disk, all or nothing.

Takes tensors, configs and texts; gives MODEL_OUT built in a temporary folder beside it and renamed into
place only when complete, with safetensors shards and their index, and the sha256 of every file
(`manifest.py`). Open `writer.py` first.
"""
