"""Metric writing and progress bars for every training job.

:class:`Writer` is the one metric interface the jobs use: scalars, images, text and
hyperparameters, then ``flush``/``close``. It writes TensorBoard event files through
tensorboardX on process 0 and does nothing on the other processes, so multi-host jobs call it
unconditionally. :func:`progress` is the matching tqdm bar (also process 0 only).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
from tqdm.auto import tqdm


def _scalar(value: Any) -> float:
    return float(np.asarray(value))


class Writer:
    """TensorBoard metrics of one run (process 0 only).

    Args:
      logdir: the run's event directory (created on first use).
      active: write at all; default: this is process 0.
    """

    def __init__(self, logdir: str | os.PathLike, *, active: bool | None = None):
        self.logdir = os.fspath(logdir)
        self.active = jax.process_index() == 0 if active is None else bool(active)
        self._writer = None
        if self.active:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(logdir=self.logdir, flush_secs=30)

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """One scalar per tag at ``step`` (device values are fetched here)."""
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, _scalar(value), int(step))

    def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """uint8 images ``[H, W, 3]`` (e.g. a sample grid from :func:`hdb_jax.common.images.grid`) per tag."""
        if self._writer is not None:
            for tag, image in images.items():
                image = np.asarray(image)
                if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                    raise ValueError(
                        f"image '{tag}': expected uint8 [H, W, 3], got {image.dtype} {image.shape}"
                    )
                self._writer.add_image(tag, image, int(step), dataformats="HWC")

    def text(self, step: int, tag: str, text: str) -> None:
        """A Markdown text summary (a config, a table) at ``step``."""
        if self._writer is not None:
            self._writer.add_text(tag, text, int(step))

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
        """The run's hyperparameters with its final metrics, for TensorBoard's HParams tab.

        Values that are not bool/int/float/str are written as their string.
        """
        if self._writer is not None:
            clean = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()}
            self._writer.add_hparams(clean, {k: _scalar(v) for k, v in metrics.items()}, name="hparams")

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int, initial: int = 0, desc: str = "train"):
    """A tqdm bar on process 0 (disabled elsewhere)."""
    return tqdm(total=total, initial=initial, desc=desc, disable=jax.process_index() != 0, dynamic_ncols=True)
