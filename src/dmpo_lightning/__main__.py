"""``python -m dmpo_lightning`` runs the ``dmpo`` command."""

from dmpo_lightning.cli import main

if __name__ == "__main__":
    main()
