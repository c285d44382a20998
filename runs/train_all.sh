#!/usr/bin/env bash
# Background training of the bundled checkpoints; every step resumes where it stopped.
set -e
cd "$(dirname "$0")/.."
P=${PYTHON:-.venv/bin/python}
$P -m vitkd experiment configs/imagenette.yaml --threads 2
$P -m vitkd experiment configs/cifar10.yaml --threads 2
