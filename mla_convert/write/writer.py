"""Write the output checkpoint atomically: safetensors shards + index, config, tokenizer, card, report.

Everything goes into a temporary directory beside MODEL_OUT and is renamed into place only when
complete, so an interrupted or failed run never leaves something that looks like a finished model; a run
that a signal ends inside a long native call removes it too (util/signals.py runs the cleanup registered here).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..errors import ConversionError
from ..util import signals
from ..util.safetensors_io import ShardFile

TMP_PREFIX = ".mla-convert-tmp-"
DEFAULT_SHARD_BYTES = 5 * 1024**3
T = TypeVar("T")
QUEUE_BYTES = 128 * 1024**2  # written-but-not-yet-on-disk tensors the writer may hold


class ShardWriter:
    """Write tensors as `model-0000i-of-0000N.safetensors` shards of bounded size, each as it arrives.

    A tensor goes straight into the open shard file (safetensors_io), so a checkpoint of any size streams
    through with memory bounded by its largest tensor plus the write queue. The bytes are written by a
    background thread (file writes release the GIL), so the disk works while the next layer is computed;
    the queue holds at most QUEUE_BYTES (or one tensor). Use as a context manager: leaving it on an error
    stops the thread before the caller removes the files.
    """

    def __init__(self, directory: Path, dtype: torch.dtype, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.directory = directory
        self.dtype = dtype
        self.max_shard_bytes = max_shard_bytes
        self._open: ShardFile | None = None
        self._shards: list[list[str]] = []
        self._background = Background(QUEUE_BYTES)
        self.total_bytes = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._background.stop(discard=exc[0] is not None)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to(device="cpu", dtype=self.dtype).contiguous()
        size = tensor.numel() * tensor.element_size()
        shard = self._open
        if (
            shard is not None
            and shard.data_bytes
            and (shard.data_bytes + size > self.max_shard_bytes or not shard.fits(name, tensor))
        ):
            self._close()
            shard = None
        if shard is None:
            shard = self._open = _guard_disk(lambda: ShardFile(self.directory / f"shard-{len(self._shards)}.tmp"))
            self._shards.append([])
        shard.record(name, tensor)
        _guard_disk(lambda: self._background.submit(lambda: shard.write(tensor), size))
        self._shards[-1].append(name)
        self.total_bytes += size

    def _close(self) -> None:
        shard = self._open
        if shard is not None:
            self._open = None
            _guard_disk(lambda: self._background.submit(shard.close, 0))

    def finish(self) -> None:
        """Name the shards for their final count and write the index when there is more than one."""
        if self._open is None and not self._shards:
            self._open = _guard_disk(lambda: ShardFile(self.directory / "shard-0.tmp"))
            self._shards.append([])
        self._close()
        _guard_disk(self._background.drain)
        count = len(self._shards)
        if count == 1:
            os.replace(self.directory / "shard-0.tmp", self.directory / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.directory / f"shard-{i}.tmp", self.directory / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(self.directory / "model.safetensors.index.json", index)


class Background:
    """Run actions in order on one thread, holding at most `limit` bytes of queued work (or one action).

    An action's exception is kept and raised in the caller's thread at its next submit or drain.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._jobs: collections.deque[tuple[Callable[[], object], int]] = collections.deque()
        self._queued = 0
        self._busy = False
        self._error: BaseException | None = None
        self._stopped = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="mla-convert-writer", daemon=True)
        self._thread.start()

    def submit(self, action: Callable[[], object], size: int) -> None:
        """Queue an action; one larger than the limit (a big embedding) is waited for, not queued."""
        with self._cond:
            while self._error is None and self._queued and self._queued + size > self.limit:
                self._cond.wait()
            self._raise()
            self._jobs.append((action, size))
            self._queued += size
            self._cond.notify_all()
        if size > self.limit:
            self.drain()

    def drain(self) -> None:
        with self._cond:
            while self._error is None and (self._jobs or self._busy):
                self._cond.wait()
            self._raise()

    def stop(self, discard: bool = False) -> None:
        with self._cond:
            if discard:
                self._clear()
            self._stopped = True
            self._cond.notify_all()
        self._thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _clear(self) -> None:
        self._queued -= sum(size for _, size in self._jobs)
        self._jobs.clear()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopped:
                    self._cond.wait()
                if not self._jobs:
                    return
                action, size = self._jobs.popleft()
                self._busy = True
            try:
                action()
            except BaseException as exc:  # handed to the caller's thread
                with self._cond:
                    self._error = exc
                    self._clear()
            finally:
                del action  # else the written tensor stays alive until the next job arrives
                with self._cond:
                    self._busy = False
                    self._queued -= size
                    self._cond.notify_all()


def write_json(path: Path, data: Any) -> None:
    _guard_disk(lambda: path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n"))


def write_text(path: Path, text: str) -> None:
    _guard_disk(lambda: path.write_text(text))


def copy_file(src: Path, dst_dir: Path) -> None:
    _guard_disk(lambda: shutil.copyfile(src, dst_dir / src.name))


def _guard_disk(action: Callable[[], T]) -> T:
    try:
        return action()
    except OSError as exc:
        if exc.errno == 28:  # ENOSPC
            raise ConversionError("no space left on the device while writing the output") from exc
        raise


def clean_stale_temps(model_out: Path) -> None:
    """Remove temporary directories that an earlier killed run left beside MODEL_OUT."""
    parent = model_out.expanduser().resolve().parent
    for stale in parent.glob(f"{TMP_PREFIX}{model_out.name}-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    return pid != os.getpid()


@contextlib.contextmanager
def atomic_output(model_out: Path, force: bool) -> Iterator[Path]:
    """Yield a temp directory; on success move it to MODEL_OUT, on any failure remove it."""
    out = model_out.expanduser().resolve()
    clean_stale_temps(out)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{out.name}-", dir=out.parent))
    final_tmp = tmp.with_name(f"{TMP_PREFIX}{out.name}-{os.getpid()}")
    os.replace(tmp, final_tmp)
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_DFL:  # an API caller's process: SIGTERM cleans up like Ctrl-C while writing
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with signals.partial(lambda: shutil.rmtree(final_tmp, ignore_errors=True)):
            yield final_tmp
            _default_permissions(final_tmp)
            old = out.with_name(f"{TMP_PREFIX}{out.name}-old-{os.getpid()}")
            with signals.committing():
                if out.exists():
                    if not force:
                        raise ConversionError(f"{model_out} appeared while converting; pass --force to replace it")
                    os.replace(out, old)
                os.replace(final_tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(final_tmp, ignore_errors=True)
        raise
    finally:
        if previous is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, previous)


def _default_permissions(directory: Path) -> None:
    """mkdtemp makes the directory private (0700); a finished model gets the permissions of a normal one."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for path in directory.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
