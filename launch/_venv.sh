# Sourced by the launch scripts: create (once) and update the project's virtual environment.
# Usage: . launch/_venv.sh EXTRAS [FIRST]   (EXTRAS: "" or "[test]"; FIRST: pinned packages
# installed before the project, e.g. torch==2.13.0); sets $VENV.
VENV=${GPTJAX_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
if [ -n "${2:-}" ]; then
  # shellcheck disable=SC2086  # FIRST is a list of requirements
  "$VENV/bin/python" -m pip install -q $2
fi
"$VENV/bin/python" -m pip install -q -e ".$1"
