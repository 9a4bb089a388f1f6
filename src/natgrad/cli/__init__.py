"""Command-line interface: ``natgrad <command>``; see :mod:`natgrad.cli.main`."""
