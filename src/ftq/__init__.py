"""ftq: a reproducible fine-tune -> merge -> quantize -> evaluate -> register -> serve pipeline."""

import os

__version__ = "0.1.0"

# Nothing in ftq may phone home: MLflow/HF telemetry off, DVC analytics off.
for _var, _value in {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DVC_NO_ANALYTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_var, _value)
