"""``python -m dmpo_lightning.deploy ARTEFACT IMAGES... --output predictions.csv``."""

from dmpo_lightning.deploy.predict_cli import main

if __name__ == "__main__":
    raise SystemExit(main())
