"""Subcommands of the ``camixer-fast`` command; see :mod:`camixer_fast.cli`."""
