"""Evaluation: ``metrics`` (IoU/IoR accuracy, AUROC), ``prior`` (the data-free priors),
``fit_thresholds`` (tau, rho, tau_hat, rho_hat with the network frozen), ``evaluate`` (a run's
folds against the priors) and ``report`` (the tables and files)."""
