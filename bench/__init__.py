"""The benchmark suite (issue 7): each figure next to its reference, ``bench/run``.
bench/README.md says what each figure measures and keeps the machine-specific numbers.
"""
