#!/usr/bin/env bash
# Re-pins tests/constraints.txt to the newest versions pyproject.toml allows: a throwaway
# virtualenv, the README's install without constraints, then `pip freeze`. Run the test suite
# with the result (the README's test command) before committing it.
#   bash tests/refresh-constraints.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
echo "installing the newest allowed versions into $venv ..."
"$venv/bin/python" -m pip install --progress-bar off torch==2.13.0 -e '.[test]'
{
    echo "# The exact versions the test suite last passed with (CI installs these)."
    echo "# Refresh: bash tests/refresh-constraints.sh, then run the README's test command."
    # torch without its local label (+cpu), so a GPU machine takes the CUDA build of the same
    # release; triton as that CUDA build requires it (it also runs the kernels' CPU interpreter).
    "$venv/bin/python" -m pip freeze --exclude-editable \
        | sed -E 's/^torch==([^+]+)\+.*/torch==\1/' \
        | sed -E 's/^triton==.*/triton==3.7.1/'
} > tests/constraints.txt
echo "wrote tests/constraints.txt ($(grep -vc '^#' tests/constraints.txt) packages)"

# tritonclient lives in its own virtualenv (tests/install-tools.sh): it needs protobuf < 7.
triton="$(dirname "$venv")/triton"
python3 -m venv "$triton"
"$triton/bin/python" -m pip install --progress-bar off \
    "tritonclient[grpc]==$(sed -n 's/^TRITONCLIENT_VERSION=//p' tests/install-tools.sh)"
{
    echo "# tritonclient's own virtualenv (tests/install-tools.sh); refreshed with tests/constraints.txt."
    "$triton/bin/python" -m pip freeze
} > tests/constraints-tritonclient.txt
echo "wrote tests/constraints-tritonclient.txt"
