#!/usr/bin/env bash
# The whole bench/gpu.py sweep on a machine with one GPU and no internet, within a time budget:
# U-Net, VAE and Mask R-CNN at batch sizes 1-32 with each fast path on and off, capture on and off;
# then the whole pipeline call and the factory's own generator stage. Writes OUT/gpu.json (every
# measurement, and the rates `jobs/build_dataset.py --estimate --rates` reads) and OUT/gpu.md.
#
#   bash bench/gpu_sweep.sh --wheels /path/to/wheels --out sweep      # on the GPU machine (any Python 3.11+)
#   bash bench/gpu_sweep.sh --small --out /tmp/sweep                  # tiny models on a CPU: the smoke test
#
# --wheels DIR: first install the project's pinned dependencies (pyproject.toml) from the wheels in
# DIR, offline, into a virtual environment of their own (.venv-gpu); the repository runs from its
# folder, so the package's own Python pin does not apply. --budget S: seconds for the whole sweep
# (default 480); each phase gets its share and keeps what it measured when its share runs out.
set -euo pipefail

wheels="" out="gpu-sweep" budget=480 small=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheels) wheels="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --budget) budget="$2"; shift 2 ;;
    --small) small="--small"; shift ;;
    *) echo "gpu_sweep.sh: unknown argument $1 (see the header of this file)" >&2; exit 2 ;;
  esac
done
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"

if [[ -n "$wheels" ]]; then
  [[ -d "$wheels" ]] || { echo "gpu_sweep.sh: no wheel folder $wheels" >&2; exit 2; }
  "$python" -m venv "$repo/.venv-gpu"
  python="$repo/.venv-gpu/bin/python"
  pins=$("$python" -c "import tomllib, sys; print('\n'.join(tomllib.load(open(sys.argv[1], 'rb'))['project']['dependencies']))" "$repo/pyproject.toml")
  # shellcheck disable=SC2086
  "$python" -m pip install --quiet --no-index --find-links "$wheels" $(echo "$pins" | sed 's/ *#.*//')
fi

mkdir -p "$out"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n "$small" ]]; then
  # tiny models on whatever device there is; compile traces without generating code (seconds, not minutes)
  phases=("--stages unet,vae,maskrcnn --paths math,sdpa,sdpa+cl,compiled --batch-sizes 1,2"
          "--stages generate,factory --paths math,compiled --batch-sizes 2")
  common="--small --repeats 1 --compile-backend aot_eager"
  shares=(50 50)
else
  # the compiled path compiles once per shape: its U-Net at two batch sizes, its pipeline at one
  phases=("--stages unet,vae,maskrcnn --paths math,sdpa,sdpa+cl --batch-sizes 1,2,4,8,16,32"
          "--stages unet --paths compiled --batch-sizes 8,32"
          "--stages generate,factory --paths sdpa+cl,compiled --batch-sizes 8")
  common="--repeats 3"
  shares=(35 25 40)
fi

reports=()
for i in "${!phases[@]}"; do
  seconds=$(( budget * shares[i] / 100 ))
  report="$out/phase-$i.json"
  echo "== phase $((i + 1))/${#phases[@]}: ${phases[i]} (${seconds} s)"
  # --budget-seconds stops starting configurations; the timeout ends one that runs on (a compilation)
  # shellcheck disable=SC2086
  timeout --signal=INT $(( seconds + 120 )) "$python" -m bench.gpu ${phases[i]} $common \
      --budget-seconds "$seconds" --out "$report" || echo "phase $((i + 1)) ended early (status $?)"
  [[ -f "$report" ]] && reports+=("$report")
done
"$python" -m bench.gpu --merge "${reports[@]}" --out "$out/gpu.json" --markdown "$out/gpu.md"
echo "sweep written to $out/gpu.json and $out/gpu.md"
