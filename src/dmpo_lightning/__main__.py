"""``python -m dmpo_lightning`` runs the ``dmpo`` command."""

from dmpo_lightning.console import console_main

if __name__ == "__main__":
    console_main()
