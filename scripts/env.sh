# Sourced by run.sh and test.sh: makes sure a virtual environment is active (the one already active,
# else .venv in the checkout, made on first use), so that nothing is installed into the system's Python
# and no package an earlier project left there is seen.
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
