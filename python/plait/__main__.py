"""``python -m plait ...`` is the ``plait`` command."""

from plait.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
