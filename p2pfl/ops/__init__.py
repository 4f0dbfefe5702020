"""What people run and read: the console scripts, the local launcher, metrics export, and the
run report (its numbers and its pages)."""
