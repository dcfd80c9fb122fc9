"""Training: ``loop`` (one fold: set-up, ``train_one_epoch``, ``validate``, checkpoints),
``runner`` (folds, stages, the paper's alternation), ``runtime`` (device, precision, DDP, random
state) and ``losses`` (li2018, the threshold loss and its sigmoid relaxation)."""
