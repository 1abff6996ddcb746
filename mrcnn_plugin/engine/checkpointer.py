"""Checkpoints that survive a kill and never hold NaN or Inf.

fvcore's ``Checkpointer.save`` writes ``model_xxx.pth`` and then ``last_checkpoint`` in place:
a process killed while writing leaves a truncated file, or an empty ``last_checkpoint``, and
resuming fails. It also saves weights that already diverged, and ``last_checkpoint`` then names
them. :class:`SafeCheckpointer` refuses non-finite tensors, writes each file to a temporary file
in the same folder (flushed and fsync'ed) and renames it over the target with ``os.replace``,
which is atomic on POSIX and Windows: a reader sees the old file or the new one, never a part.
``last_checkpoint`` is written the same way, after the checkpoint is complete.

Resuming reads the file named by ``last_checkpoint`` without running code from it
(:func:`mrcnn_plugin.checkpoint.read_checkpoint`) and loads the model strictly: the trainer's
own checkpoint must fit its model exactly.
"""

import os
import tempfile
from typing import Any, BinaryIO, Callable, Dict, List, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..checkpoint import read_checkpoint

__all__ = ["NonFiniteCheckpointError", "SafeCheckpointer", "atomic_write", "non_finite_tensors"]

LAST_CHECKPOINT = "last_checkpoint"  # the file fvcore's has_checkpoint() looks for


class NonFiniteCheckpointError(FloatingPointError):
    """A checkpoint to save (or resume from) holds NaN or Inf; the message names the tensors."""


def non_finite_tensors(data: Any, prefix: str = "") -> List[str]:
    """The dotted names of the floating-point tensors in ``data`` (nested dicts, lists and
    tuples) that hold a NaN or an Inf."""
    if isinstance(data, torch.Tensor):
        finite = not data.is_floating_point() or bool(torch.isfinite(data).all())
        return [] if finite else [prefix or "<tensor>"]
    if isinstance(data, float):
        return [] if data == data and abs(data) != float("inf") else [prefix or "<float>"]
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, (list, tuple)):
        items = enumerate(data)
    else:
        return []
    found = []
    for key, value in items:
        found += non_finite_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    return found


def _fsync_folder(folder: str) -> None:
    """Makes a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[BinaryIO], Any]) -> None:
    """Calls ``write(f)`` on a temporary file in ``path``'s folder, then flushes, fsyncs and
    renames it to ``path`` (``os.replace``): ``path`` is at every moment either its old content
    (or absent) or all that ``write`` wrote. If ``write`` fails, the temporary file is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def _remove_leftovers(folder: str, basename: str) -> None:
    """Removes the temporary files of earlier saves of ``basename`` that were killed (one
    process saves into a folder, as in detectron2: none of them is still being written)."""
    for name in os.listdir(folder):
        if name.startswith(f".{basename}.") and name.endswith(".tmp"):
            try:
                os.unlink(os.path.join(folder, name))
            except FileNotFoundError:
                pass


class SafeCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose saves are atomic and refuse non-finite tensors, and whose
    resume reads the last checkpoint with weights-only loading (see the module docstring).
    Loading MODEL.WEIGHTS (not resuming) is DetectionCheckpointer's."""

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        bad = non_finite_tensors(data)
        if bad:
            iteration = data.get("iteration", data.get("trainer", {}).get("iteration", "?"))
            raise NonFiniteCheckpointError(
                f"not saving {path} (iteration {iteration}): {len(bad)} tensors hold NaN or "
                f"Inf, e.g. {', '.join(bad[:8])}; {LAST_CHECKPOINT} still names the last good one"
            )
        os.makedirs(self.save_dir, exist_ok=True)
        _remove_leftovers(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {path}")
        atomic_write(path, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        os.makedirs(self.save_dir, exist_ok=True)
        path = os.path.join(self.save_dir, LAST_CHECKPOINT)
        atomic_write(path, lambda f: f.write(last_filename_basename.encode()))

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        if resume and self.has_checkpoint():
            return self.load_for_resume(self.get_checkpoint_file())
        if path:
            # detectron2's loader unpickles .pkl files as they are: vet the file first, so a
            # hostile MODEL.WEIGHTS is refused here too, not only by the command-line tools.
            read_checkpoint(path)
        return super().resume_or_load(path, resume=False)

    def load_for_resume(self, path: str, checkpointables: Optional[List[str]] = None) -> dict:
        """Loads the model (strictly) and the checkpointables from one of this checkpointer's
        own checkpoints, read with weights-only loading; returns the other saved entries."""
        self.logger.info(f"Resuming from {path} ...")
        checkpoint = read_checkpoint(path)
        bad = non_finite_tensors(checkpoint)
        if bad:
            raise NonFiniteCheckpointError(
                f"checkpoint {path}: {len(bad)} tensors hold NaN or Inf, e.g. {', '.join(bad[:8])}"
            )
        self.model.load_state_dict(checkpoint.pop("model"), strict=True)
        for key in self.checkpointables if checkpointables is None else checkpointables:
            if key in checkpoint:
                self.checkpointables[key].load_state_dict(checkpoint.pop(key))
        return checkpoint
