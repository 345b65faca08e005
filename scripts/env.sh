# Sourced by run.sh and test.sh: makes a virtual environment active (the one already active, else .venv
# in the checkout, made on first use), so that nothing is installed into the system's Python and no
# package an earlier project left there is seen.
if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -f .venv/bin/activate ]; then  # a venv made without ensurepip has no activate: made anew
    . scripts/venv_support.sh
    python3 -m venv --clear .venv
  fi
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
