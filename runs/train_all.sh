#!/usr/bin/env bash
# Background training of the bundled checkpoints; every step resumes where it stopped.
# THREADS sets torch's CPU threads (default 2, this machine's cores).
set -e
cd "$(dirname "$0")/.."
P=${PYTHON:-.venv/bin/python}
T=${THREADS:-2}
$P -m vitkd experiment configs/imagenette.yaml --threads "$T"
$P -m vitkd experiment configs/cifar10.yaml --threads "$T"
