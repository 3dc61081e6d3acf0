"""What runs or reads many runs: ``compare`` (every design on one grid, verdicts), ``sweep`` (a
grid on Dask distributed, resumable), ``report`` (tables and plots from saved results), ``cleanup``
(dead runs' segments and run directories). lab/ uses vm/ and ipc/; nothing below imports lab/."""
