"""The stargz-tui benchmark suite (issue 7): ``bench/run`` or ``python -m bench``."""
