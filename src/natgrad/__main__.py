"""``python -m natgrad``: the same command-line interface as the ``natgrad`` script."""

from natgrad.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
