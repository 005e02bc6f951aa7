"""Training: the loss, the loop, its hyper-parameters, and what the in-process and Ray Train trainers share."""
