"""ftq's own lm-eval tasks (YAML + utils.py); lm-eval loads them by path via TaskManager(include_path=...)."""
