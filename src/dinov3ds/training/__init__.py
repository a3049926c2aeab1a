"""Training: the Lightning module and trainer, losses, the feature cache, reports and interrupt handling."""
