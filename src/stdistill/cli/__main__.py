"""``python -m stdistill.cli``: the ``stdistill`` command."""

from . import main

if __name__ == "__main__":
    main()
