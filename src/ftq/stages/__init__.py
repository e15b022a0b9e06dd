"""One module per pipeline stage; each exposes `run(params) -> result`."""

from pathlib import Path

MERGED_DIR = Path("models/merged")


def merged_model(root: Path) -> Path:
    """models/merged under `root`, which the stages after merge read: an error saying what to run if it is absent."""
    merged = root / MERGED_DIR
    if not (merged / "config.json").exists():
        raise FileNotFoundError(f"{merged}: no merged model; run `dvc repro merge` first")
    return merged
