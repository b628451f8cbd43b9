"""Retraining: the bot fine-tunes its model on consented conversations and serves the result if better.

Two processes take part. The child (`python -m bot.retrain`, started by `/retrain` or from a shell) exports,
trains, evaluates and promotes, and reports JSON events on stdout; the bot's side starts, follows and
cancels it and keeps the admin's message up to date. The registry (model/training/registry.py) is the only
thing they share: whoever promotes, the bot's watcher sees `current` change and hot-reloads the worker.

Reading order:
    options.py     RetrainOptions: what one run does, declared once (child flags, argv, slash help)
    pipeline.py    the child: export → train → register → evaluate → promote, its events, its entry point
    evaluation.py  two models measured side by side on one export (the numbers a promotion is decided on)
    runner.py      the bot's side of the child: its environment, starting, reading, cancelling it
    progress.py    RetrainStatus (what the events told so far) and the admin's progress/result text
    watcher.py     the hot reload: a new `current` in the registry is loaded by the running worker
    versions.py    `chatbot models` / `promote` / `rollback`

Which model is being served is answered by bot/runtime.py:model_source, for the worker and for this package.
The slash commands are in bot/cogs/retrain.py.
"""
