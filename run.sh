#!/usr/bin/env bash
# One entry point for a fresh machine. Each command sets up what it needs, then runs:
#   ./run.sh main   prune-train a CNN on Fashion-MNIST and print/plot the results
#   ./run.sh test   run the test suite
# Extra arguments go to the command (e.g. ./run.sh test -k patterns).
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
VENV=${CLICKTRAIN_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}

setup_env() {
    # Reuse the venv while pyproject.toml is unchanged and its editable install is this
    # checkout (a venv shared through CLICKTRAIN_VENV by two checkouts would otherwise run
    # the other one's code from scripts and the clicktrain command); otherwise (re)install.
    local stamp="$VENV/.clicktrain-installed"
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY" -m venv "$VENV"
    fi
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$(cat "$stamp")" != "$ROOT" ]; then
        "$VENV/bin/python" -m pip install -q --upgrade pip
        # torch==2.13.0 is pinned in pyproject.toml: pip takes the local CPU wheel.
        "$VENV/bin/python" -m pip install -q -e ".[test]"
        echo "$ROOT" > "$stamp"
    fi
}

find_data() {
    # Fashion-MNIST: $CLICKTRAIN_DATA, the Debian package's place, a checkout's shared data,
    # else install the Debian package.
    local d
    for d in "${CLICKTRAIN_DATA:-}" /usr/share/datasets/fashion-mnist "$ROOT/../shared/data/fashion-mnist"; do
        if [ -n "$d" ] && ls "$d"/train-images-idx3-ubyte* >/dev/null 2>&1; then
            export CLICKTRAIN_DATA="$d"; return 0
        fi
    done
    if command -v apt-get >/dev/null 2>&1; then
        local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
        echo "Fashion-MNIST not found: installing the Debian package dataset-fashion-mnist" >&2
        $sudo apt-get install -y -q dataset-fashion-mnist >&2 || { $sudo apt-get update -q >&2 && $sudo apt-get install -y -q dataset-fashion-mnist >&2; }
        export CLICKTRAIN_DATA=/usr/share/datasets/fashion-mnist; return 0
    fi
    echo "Fashion-MNIST not found and apt-get is not available: set CLICKTRAIN_DATA to a directory" \
         "holding train-images-idx3-ubyte.gz and friends" >&2
    return 1
}

cmd=${1:-}; shift || true
case "$cmd" in
    main)
        setup_env; find_data
        exec "$VENV/bin/clicktrain" train --data "$CLICKTRAIN_DATA" --out runs/train "$@" ;;
    test)
        setup_env; find_data
        export CLICKTRAIN_CACHE=${CLICKTRAIN_CACHE:-$ROOT/build/cache}
        set +e
        "$VENV/bin/python" -m pytest "$@"
        rc=$?
        # pytest exit 5 means no test ran: that must fail, never pass silently.
        [ $rc = 5 ] && echo "pytest collected no tests: failing" >&2
        exit $rc ;;
    *)
        echo "usage: ./run.sh main [args]   |   ./run.sh test [pytest args]" >&2; exit 2 ;;
esac
