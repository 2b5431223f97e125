"""``dmpo serve ARTEFACT [options]`` (the same as ``dmpo serve``)."""

import sys

from dmpo_lightning.serve.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m dmpo_lightning.serve"))
