"""The checkpoint logic: plan, save, restore, and the on-disk record of each VM."""
