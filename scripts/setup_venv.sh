# Sourced by scripts/quickstart.sh and .ci/run (bash): a venv with torch==2.13.0 and requirements.txt that says
# what it downloads and from where.
#   . scripts/setup_venv.sh && setup_venv DIR [PACKAGE ...]
# creates DIR if missing (with $PYTHON, default python3), activates it, installs torch, requirements.txt and the
# optional PACKAGEs (a failure there is a warning). Which torch:
#   TORCH_INDEX_URL set              torch==2.13.0 from that wheel index (e.g. https://download.pytorch.org/whl/cu128)
#   CUDA (nvidia-smi lists a GPU)    the venv's torch if it has one, else torch==2.13.0 from pip's default index:
#                                    the CUDA build, several GB with its nvidia-* wheels
#   torch 2.13.0 already in the venv kept
#   pip has its own package sources  torch==2.13.0 from them (`pip config list`: index-url, extra-index-url,
#                                    find-links; a mirror or a local wheelhouse)
#   otherwise (no CUDA)              the CPU build, ~190 MB, from https://download.pytorch.org/whl/cpu

TORCH_PIN=torch==2.13.0
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

say() { echo "== $*" >&2; }

has_cuda() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }

pip_sources() {  # the package sources pip is configured with (files and PIP_* variables), one per line
  python -m pip config list 2>/dev/null | grep -E '\.(index-url|extra-index-url|find-links)=' || true
}

pip_install() {  # pip install, showing what it downloads or takes from disk and what it installs; errors in full
  python -m pip install --progress-bar off "$@" \
    | { grep -E '^ *(Downloading|Processing|Successfully installed)' >&2 || true; }
}

install_torch() {
  local have
  have=$(python -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    say "torch: $TORCH_PIN from TORCH_INDEX_URL=$TORCH_INDEX_URL"
    pip_install "$TORCH_PIN" --index-url "$TORCH_INDEX_URL"
  elif has_cuda; then
    if [ -n "$have" ]; then
      say "torch: CUDA machine, keeping the installed torch $have"
      return
    fi
    say "torch: CUDA machine, $TORCH_PIN from pip's default index: the CUDA build, several GB with its nvidia-* wheels"
    pip_install "$TORCH_PIN"
  elif [ "${have%%+*}" = "${TORCH_PIN#torch==}" ]; then
    say "torch: $have already installed"
  elif [ -n "$(pip_sources)" ]; then
    say "torch: no CUDA; $TORCH_PIN from pip's configured sources ($(pip_sources | paste -sd ' ' -)); for the CPU build" \
        "from $TORCH_CPU_INDEX instead: TORCH_INDEX_URL=$TORCH_CPU_INDEX"
    pip_install "$TORCH_PIN"
  else
    say "torch: no CUDA, so the CPU build of $TORCH_PIN (~190 MB) from $TORCH_CPU_INDEX (TORCH_INDEX_URL picks another)"
    pip_install "$TORCH_PIN" --index-url "$TORCH_CPU_INDEX"
  fi
}

setup_venv() {
  local venv=$1 pkg
  shift
  if [ ! -x "$venv/bin/python" ]; then
    say "creating $venv"
    "${PYTHON:-python3}" -m venv "$venv"
  fi
  # shellcheck disable=SC1091
  . "$venv/bin/activate"
  install_torch  # first, so that requirements.txt's loose torch>=2.5 is already met
  say "requirements.txt: $(grep -oE '^[A-Za-z0-9_.-]+' requirements.txt | grep -v '^torch$' | paste -sd ' ' -)"
  pip_install -r requirements.txt
  for pkg in "$@"; do
    say "$pkg (optional)"
    pip_install "$pkg" || say "WARNING: $pkg could not be installed; continuing without it"
  done
}
