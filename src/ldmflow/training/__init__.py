"""The training engine every stage shares: the loop, batching, optimisation, preemption and DDP."""
