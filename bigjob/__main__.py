"""``python -m bigjob``: the same as the ``bigjob`` command."""

from bigjob.cli import main

if __name__ == "__main__":
    main()
