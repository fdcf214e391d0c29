"""Hooks into the training loop: what a run reports, as it happens.

    class PrintLoss(Callback):
        def on_log(self, step, record):
            print(step, record["loss"])

    multimodal_models.train("configs/shapes-vlm.yaml", callbacks=[PrintLoss()])

The loop calls the hooks of every callback on the main process only (rank 0 under torchrun),
in the order given. A plain function is taken as `on_log`. `TensorBoardLogger` writes the same
records as TensorBoard event files; the loop adds one on its own when `train.tensorboard` asks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..errors import MissingDependencyError


class Callback:
    """Override the hooks you need; each is a no-op here."""

    def on_train_begin(self, config, start_step: int) -> None:
        """Before the first step (start_step > 0 when a run resumes)."""

    def on_log(self, step: int, record: dict) -> None:
        """Every train.log_every steps: loss, lr, examples_per_s, tokens_per_s (images_per_s)."""

    def on_evaluate(self, step: int, metrics: dict) -> None:
        """After each evaluation: the headline metrics ({"vqa/accuracy": ..., ...})."""

    def on_save(self, step: int, path: Path) -> None:
        """After a checkpoint folder was written (checkpoints/last or checkpoints/best)."""

    def on_train_end(self, summary: dict) -> None:
        """After the run, with what `train` returns."""


class _FunctionCallback(Callback):
    def __init__(self, function: Callable[[int, dict], Any]):
        self.function = function

    def on_log(self, step: int, record: dict) -> None:
        self.function(step, record)


class Callbacks(Callback):
    """Several callbacks called as one."""

    def __init__(self, callbacks: Iterable[Callback | Callable] = ()):
        self.callbacks = []
        for callback in callbacks:
            if isinstance(callback, Callback):
                self.callbacks.append(callback)
            elif callable(callback):
                self.callbacks.append(_FunctionCallback(callback))
            else:
                raise TypeError(f"a callback is a Callback or a function (step, record); got {type(callback).__name__}")

    def on_train_begin(self, config, start_step: int) -> None:
        for callback in self.callbacks:
            callback.on_train_begin(config, start_step)

    def on_log(self, step: int, record: dict) -> None:
        for callback in self.callbacks:
            callback.on_log(step, record)

    def on_evaluate(self, step: int, metrics: dict) -> None:
        for callback in self.callbacks:
            callback.on_evaluate(step, metrics)

    def on_save(self, step: int, path: Path) -> None:
        for callback in self.callbacks:
            callback.on_save(step, path)

    def on_train_end(self, summary: dict) -> None:
        for callback in self.callbacks:
            callback.on_train_end(summary)


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs the package)
    except ImportError:
        return False
    return True


class TensorBoardLogger(Callback):
    """TensorBoard event files in `log_dir`: train/loss, train/lr, the throughputs, and every
    evaluation metric under eval/. A resumed run drops the events after its checkpoint."""

    def __init__(self, log_dir: str | Path):
        if not tensorboard_available():
            raise MissingDependencyError("train.tensorboard: TensorBoard logs need the tensorboard package: "
                                  "pip install tensorboard (or set train.tensorboard: false)")
        self.log_dir = Path(log_dir)
        self.writer = None

    def on_train_begin(self, config, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # heavy: tensorboard

        self.writer = SummaryWriter(str(self.log_dir), purge_step=start_step or None, flush_secs=10)

    def on_log(self, step: int, record: dict) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{key}", value, step)

    def on_evaluate(self, step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"eval/{key}", value, step)
        self.writer.flush()

    def on_train_end(self, summary: dict) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
