"""Command-line tools (``tools/*.py`` and the console entry points call their ``main``):

- :mod:`.train_net`: train / evaluate with detectron2's DefaultTrainer conventions.
- :mod:`.demo`: draw predictions on images and videos, and write them as COCO JSON.
- :mod:`.plot_metrics`: plot a training run's ``metrics.json``.
"""
