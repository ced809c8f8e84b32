# Sourced by the GPU scripts: pydantic from runs-gpu/wheels where the GPU box lacks it (pip download
# --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d runs-gpu/wheels pydantic),
# the repository on PYTHONPATH (the package need not be installed), and $device for every number.
if ! python -c "import pydantic" 2>/dev/null; then
    pip install --quiet --no-index --target /tmp/pydeps runs-gpu/wheels/*.whl
    export PYTHONPATH=/tmp/pydeps
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
device=$(python -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU')")
echo "device: $device"
