"""Default folders, relative to the current directory unless an environment variable names them.

    VAE_DIST_RUNS   folder of runs                 (default ./runs)
    VAE_DIST_DATA   folder the data sets live in   (default ./data)

export/sample.py, which must run without this package, mirrors RUNS_ENV and DEFAULT_RUNS.
"""

from __future__ import annotations

import os
from pathlib import Path

RUNS_ENV = "VAE_DIST_RUNS"
DEFAULT_RUNS = "runs"
DATA_ENV = "VAE_DIST_DATA"
DEFAULT_DATA = "data"


def runs_dir() -> Path:
    return Path(os.environ.get(RUNS_ENV) or DEFAULT_RUNS)


def data_dir() -> Path:
    return Path(os.environ.get(DATA_ENV) or DEFAULT_DATA)
