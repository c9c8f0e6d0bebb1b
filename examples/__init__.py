"""Runnable examples for jgc; each module has a ``main()`` and runs in seconds on CPU."""
