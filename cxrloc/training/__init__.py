"""Training: ``loop`` (one fold: set-up, epochs, checkpoints; its pieces in ``stage_setup`` and
``epoch``: ``train_one_epoch``, ``validate``),
``runner`` (folds, stages, the paper's alternation), ``runtime`` (device, precision, DDP, random
state) and ``losses`` (li2018, the threshold loss and its sigmoid relaxation)."""
