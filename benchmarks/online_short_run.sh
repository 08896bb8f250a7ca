#!/bin/bash
# The README's short-schedule table of the online and self-distillation methods (issue 14).
#
#   benchmarks/online_short_run.sh CIFAR10_FOLDER OUT_DIR [NAME ...]
#
# CIFAR10_FOLDER holds train/<class>/*.jpg and test/<class>/*.jpg (e.g. the shared
# cifar10-jpeg.tar.gz, extracted). Every run: 10% of the training split (5,000 images,
# class-balanced, seed 0), the first 200 test images of each class (2,000; a link farm made in
# OUT_DIR/data), 6 epochs, batch 64, the cifar protocol otherwise (lr 0.05, x0.1 at 62.5/75/87.5%).
# ONE's and OKDDip's consistency ramp-up is scaled like the schedule: their code ramps over 80 of
# 300 epochs, here over 1.6 of 6 (--method_args=rampup=1.6).
# Each run writes OUT_DIR/NAME/ (train dir) and OUT_DIR/NAME.log; NAME arguments pick runs (default:
# all). Print the table with: python benchmarks/online_table.py OUT_DIR
set -u
SRC=$(cd "$1" && pwd); OUT=$(mkdir -p "$2" && cd "$2" && pwd); shift 2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DATA=$OUT/data/cifar10
if [ ! -d "$DATA/test" ]; then
  mkdir -p "$DATA/test" && ln -sfn "$SRC/train" "$DATA/train"
  for c in "$SRC"/test/*/; do
    c=$(basename "$c"); mkdir -p "$DATA/test/$c"
    ls "$SRC/test/$c" | sort -n | head -200 | while read -r f; do
      ln -sf "$SRC/test/$c/$f" "$DATA/test/$c/$f"; done
  done
fi
RUNS=(
  "none_resnet32 --method=none --arch=resnet32"
  "ONE_resnet32 --method=ONE --arch=resnet32 --method_args=rampup=1.6"
  "CL_resnet32 --method=CL --arch=resnet32"
  "OKDDip_resnet32 --method=OKDDip --arch=resnet32 --method_args=rampup=1.6"
  "BYOT_resnet32 --method=BYOT --arch=resnet32"
  "none_resnet20 --method=none --arch=resnet20"
  "DML_resnet20x2 --method=DML --arch=resnet20 --peers=resnet20"
  "KDCL_resnet20x2 --method=KDCL --arch=resnet20 --peers=resnet20"
  "none_resnet8 --method=none --arch=resnet8"
  "CSKD_resnet8 --method=CS-KD --arch=resnet8"
  "TAKD_56_20_8 --method=ST --arch=resnet8 --teacher_arch=resnet56 --assistants=resnet20"
)
for spec in "${RUNS[@]}"; do
  read -r name args <<< "$spec"
  if [ $# -gt 0 ] && [[ ! " $* " =~ " $name " ]]; then continue; fi
  start=$(date +%s)
  # shellcheck disable=SC2086
  "${PYTHON:-python}" "$ROOT/train.py" --dataset="folder:$DATA" --fraction=0.1 --epochs=6 --batch_size=64 \
    --seed=0 --train_dir="$OUT/$name" $args > "$OUT/$name.log" 2>&1
  echo "$name: exit $? after $(( $(date +%s) - start )) s"
done
