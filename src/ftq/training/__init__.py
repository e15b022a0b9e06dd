"""Training helpers behind the `train` stage: settings, model setup, callbacks, distributed launch."""
