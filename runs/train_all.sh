#!/usr/bin/env bash
# Background training of the bundled checkpoints; every step resumes where it stopped.
# THREADS sets torch's CPU threads (default 2, this machine's cores). The CIFAR-10 students
# that need the finished teacher train in two lanes of one thread each: on 2 cores this
# trains more images per second than one process with two threads (small matrices).
set -e
cd "$(dirname "$0")/.."
P=${PYTHON:-.venv/bin/python}
T=${THREADS:-2}
C=configs/cifar10.yaml
$P -m vitkd experiment configs/imagenette.yaml --threads "$T"
$P -m vitkd experiment $C --threads "$T" --only teacher student-baseline student-baseline-seed1
$P -m vitkd experiment $C --threads 1 --only student-b2b-kl student-b2b-mse student-h2h-kl-gated \
    student-kd student-kd-seed1 student-h2h-kl-student-correct student-h2h-kl-doubt-seed1 \
    student-h2h-kl-student-correct-seed1 > runs/lane1.log 2>&1 &
$P -m vitkd experiment $C --threads 1 --only student-e2e-mse student-h2h-kl student-h2h-kl-seed1 \
    student-h2h-kl-kd student-h2h-kl-kd-seed1 student-h2h-kl-confidence student-deit-h2h-kl student-h2h-kl-doubt \
    student-deit > runs/lane2.log 2>&1 &
wait
$P -m vitkd experiment $C --threads "$T"  # the rest (student-h2h-kl-ranked); writes results and the bundle
# Issue 14: across patch grids (needs the CIFAR-10 teacher above).
$P -m vitkd experiment configs/cifar10_grid.yaml --threads "$T"
# Issue 13: SL-ViT teacher, then its baseline and distilled students in two lanes. The second seeds
# (student-sl-*-seed1) run only if seed 0's gap is within 1 point: `--only student-sl-baseline-seed1 ...`.
S=configs/cifar10_sl.yaml
$P -m vitkd experiment $S --threads "$T" --only teacher-sl
$P -m vitkd experiment $S --threads 1 --only student-sl-baseline > runs/lane1-sl.log 2>&1 &
$P -m vitkd experiment $S --threads 1 --only student-sl-h2h-kl > runs/lane2-sl.log 2>&1 &
wait
