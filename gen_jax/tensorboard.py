"""TensorBoard event files of a run: every metrics record as scalars, written beside it.

`WORKDIR/tensorboard/` gets, per epoch: each expert's training loss and accuracy
(`train/<role>/loss`), each evaluated model's test clean and PGD accuracy
(`test/<role>/clean_acc`), the global model's validation accuracy, β or the expert weights, the
learning rates and the training speed in images per second; `tensorboard --logdir runs` (or
Colab's `%tensorboard --logdir runs`) shows them live. The files are written through
tensorboardX, which needs no TensorFlow; where it is not installed (a GPU/TPU image), the run
trains as usual and says once how to get the curves.

Like `metrics.jsonl`, the events are a copy of the checkpoint's records: a resumed run opens a
new event file with `purge_step` at the first epoch it retrains, so TensorBoard drops the
earlier copies of those epochs and shows each epoch once.

Synopsis::

    writer = EventWriter.open("runs/pilot", first_epoch=1)  # None without tensorboardX
    writer.write(record)                                 # one metrics.jsonl record
    writer.close()
"""
from __future__ import annotations

import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

DIRECTORY = "tensorboard"


def scalars(record: Mapping[str, Any],
            images_per_epoch: int | None = None) -> Iterator[tuple[str, float]]:
  """(tag, value) of every number of a metrics record that a curve is drawn of."""
  for role, m in record.get("train", {}).items():
    for name, value in m.items():
      yield f"train/{role}/{name}", value
  for split in ("test", "validation"):
    for role, m in record.get(split, {}).items():
      for name, value in m.items():
        yield f"{split}/{role}/{name}", value
  for role, value in record.get("lr", {}).items():
    yield f"schedule/lr/{role}", value
  if "beta" in record:
    yield "schedule/beta", record["beta"]
  for role, value in record.get("weights", {}).items():
    yield f"schedule/weight/{role}", value
  if images_per_epoch and record.get("train_seconds"):
    yield "speed/images_per_second", images_per_epoch / record["train_seconds"]


class EventWriter:
  """Appends metrics records to the run's TensorBoard event files (process 0 only)."""

  def __init__(self, writer: Any, images_per_epoch: int | None):
    self._writer = writer
    self._images_per_epoch = images_per_epoch

  @classmethod
  def open(cls,
           workdir: str | pathlib.Path,
           *,
           first_epoch: int,
           images_per_epoch: int | None = None) -> "EventWriter | None":
    """A writer whose new file supersedes earlier events from `first_epoch` on; None without
    tensorboardX (a message says how to install it)."""
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    except ImportError:
      print("TensorBoard curves are off: `pip install tensorboardX` writes them to "
            f"{pathlib.Path(workdir) / DIRECTORY} (metrics.jsonl holds the same figures).")
      return None
    # The suffix keeps two writers opened in the same second (a quick resume) apart: the file
    # name is otherwise only the time and the host.
    writer = SummaryWriter(str(pathlib.Path(workdir) / DIRECTORY),
                           purge_step=first_epoch,
                           filename_suffix=f".from-epoch-{first_epoch}")
    return cls(writer, images_per_epoch)

  def write(self, record: Mapping[str, Any]) -> None:
    """The scalars of one epoch's record, at step = the epoch; flushed at once."""
    for tag, value in scalars(record, self._images_per_epoch):
      self._writer.add_scalar(tag, float(value), int(record["epoch"]))
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()
