"""Sparse pre-training (gradual global magnitude pruning, algorithms.md B): the `sparsity:` section (`config`),
which weights are prunable (`select`), the distributed threshold (`threshold`) and when to prune with the running
mean parameter count (`plan`). The hook raypt/hooks/pruning.py ties them to the loop. Light: config imports it."""
