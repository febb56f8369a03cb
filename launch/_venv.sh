# Sourced by the launch scripts: create (once) and update the project's virtual environment.
# Usage: . launch/_venv.sh EXTRAS   (EXTRAS: "" or "[test]"); sets $VENV.
VENV=${GPTJAX_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q -e ".$1"
