# Sourced: installs what `python3 -m venv` needs where it is missing (Debian's python3 without
# python3-venv, which leaves a venv without pip or activate).
if ! python3 -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("ensurepip.__main__") is None)' \
    2>/dev/null; then
  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >/dev/null
fi
