"""Trainer callbacks: a progress bar with loss, real tokens/s and ETA; a step-wise history that goes to
MLflow and to the CSV/PNG reports. Only the main process (rank 0) writes anything."""

from __future__ import annotations

import time
from typing import Any

from transformers import TrainerCallback


class History(TrainerCallback):
    """Collects every logged value by step, with real-token throughput between logs. Throughput counts
    only time spent in training steps, so evaluations and checkpoint saves do not dilute it."""

    def __init__(self, on_log=None, extra_prefixes: tuple[str, ...] = ()):
        self.train: list[dict[str, float]] = []
        self.extra_prefixes = extra_prefixes  # more logged values to keep (TRL's rewards/..., logps/...)
        self.eval: list[dict[str, float]] = []
        self.on_log_hook = on_log
        self._last_time: float | None = None
        self._last_tokens = 0
        self.tokens_per_second = 0.0
        self.initial_eval_loss: float | None = None
        self.train_seconds = 0.0  # time inside training steps, all logs together
        self._step_started: float | None = None
        self._seconds_since_log = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_tokens = state.num_input_tokens_seen
        has_initial = any(e.get("step") == 0 and "eval_loss" in e for e in state.log_history)
        if self.initial_eval_loss is not None and not has_initial:
            state.log_history.insert(0, {"eval_loss": self.initial_eval_loss, "step": 0})

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_started is not None:
            elapsed = time.perf_counter() - self._step_started
            self.train_seconds += elapsed
            self._seconds_since_log += elapsed
            self._step_started = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        step = state.global_step
        if "loss" in logs:
            tokens = state.num_input_tokens_seen
            self.tokens_per_second = (tokens - self._last_tokens) / max(self._seconds_since_log, 1e-9)
            self._last_tokens, self._seconds_since_log = tokens, 0.0
            row = {"step": step, "loss": float(logs["loss"]), "tokens_per_second": round(self.tokens_per_second, 2)}
            for key in ("learning_rate", "grad_norm"):
                if key in logs and logs[key] is not None:
                    row[key] = float(logs[key])
            for key, value in logs.items():
                if key.startswith(self.extra_prefixes) and self.extra_prefixes and isinstance(value, (int, float)):
                    row[key] = float(value)
            row["tokens_seen"] = tokens
            self.train.append(row)
            # log_history is saved in every checkpoint: keeping throughput there survives a resume
            if state.log_history and state.log_history[-1].get("step") == step:
                state.log_history[-1]["tokens_per_second"] = row["tokens_per_second"]
            if self.on_log_hook:
                self.on_log_hook({k: v for k, v in row.items() if k != "step"}, step)
        if "eval_loss" in logs:
            row = {"step": step, "eval_loss": float(logs["eval_loss"])}
            self.eval.append(row)
            if self.on_log_hook:
                self.on_log_hook({"eval_loss": row["eval_loss"]}, step)


class Progress(TrainerCallback):
    """One tqdm bar: steps with ETA, and the latest loss and real tokens/s as its postfix."""

    def __init__(self, history: History):
        self.history = history
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None:
            return
        postfix: dict[str, Any] = {}
        if self.history.train:
            postfix["loss"] = f"{self.history.train[-1]['loss']:.4f}"
            postfix["tok/s"] = f"{self.history.tokens_per_second:.0f}"
        if self.history.eval:
            postfix["eval_loss"] = f"{self.history.eval[-1]['eval_loss']:.4f}"
        self.bar.set_postfix(postfix, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

