"""Training logs: the CSV tracker beside accelerate's TensorBoard one, and reading it back."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from accelerate.tracking import GeneralTracker

METRICS_FILE = "metrics.csv"


class CSVTracker(GeneralTracker):
    """An accelerate tracker writing one CSV row per logged step (``<out_dir>/metrics.csv``).

    Columns are fixed up front (step, then the given keys); a value not logged at a step is
    left empty. Rows at or after the first step this process logs are dropped when the file is
    opened, so the table of a resumed run reads like the uninterrupted run's.
    """

    name = "csv"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: str | Path, columns: list[str]):
        super().__init__()
        self.path = Path(path)
        self.columns = ["step", *columns]
        self._file = None
        self._writer = None

    @property
    def tracker(self):
        return self._writer

    def log(self, values: dict, step: int | None = None, **kwargs):
        unknown = sorted(set(values) - set(self.columns))
        if unknown:
            raise ValueError(f"{self.path}: no column for {unknown}; columns are {self.columns}")
        if self._file is None:
            self._open(step)
        self._writer.writerow({"step": step, **values})
        self._file.flush()

    def _open(self, first_step: int) -> None:
        kept = []
        if self.path.is_file():
            with open(self.path, newline="") as old:
                kept = [row for row in csv.DictReader(old) if int(row["step"]) < first_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".csv.tmp")
        with open(temporary, "w", newline="") as new:
            writer = csv.DictWriter(new, self.columns, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)
        os.replace(temporary, self.path)
        self._file = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._file, self.columns, restval="")

    def finish(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """The rows of a metrics.csv as floats (empty cells left out)."""
    with open(path, newline="") as file:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(file)]
