#!/bin/sh
# Regenerates bridge/sparkplug/sparkplug_b_pb2.py and .pyi from sparkplug_b.proto, run from the
# repository root: sh bridge/sparkplug/regenerate.sh
#
# sparkplug_b.proto is Eclipse Tahu's (https://github.com/eclipse/tahu, sparkplug_b/sparkplug_b.proto
# at commit 5736e404889d4b95910613040a99ba79589ffb13), copied unchanged; it and the code generated
# from it are under the Eclipse Public License 2.0 (SPDX-License-Identifier: EPL-2.0, see the
# proto's header), unlike the rest of iotbridge. protoc comes from grpcio-tools, installed for
# generation only (.venv/bin/pip install grpcio-tools); the runtime needs only protobuf, at
# least the version named in the generated module (ValidateProtobufRuntimeVersion).
set -eu
PY=${PY:-.venv/bin/python}
"$PY" -m grpc_tools.protoc --proto_path=. --python_out=. --pyi_out=. bridge/sparkplug/sparkplug_b.proto
for f in bridge/sparkplug/sparkplug_b_pb2.py bridge/sparkplug/sparkplug_b_pb2.pyi; do
  {
    echo "# ruff: noqa"
    echo "# Generated from bridge/sparkplug/sparkplug_b.proto, Eclipse Tahu's sparkplug_b/sparkplug_b.proto"
    echo "# (https://github.com/eclipse/tahu at 5736e404889d4b95910613040a99ba79589ffb13), copied unchanged."
    echo "# Licence: Eclipse Public License 2.0 (SPDX-License-Identifier: EPL-2.0). Do not edit."
    echo "# Regenerate with: sh bridge/sparkplug/regenerate.sh, which runs"
    echo "#   $PY -m grpc_tools.protoc --proto_path=. --python_out=. --pyi_out=. bridge/sparkplug/sparkplug_b.proto"
    echo "# then adds this header and formats the file with ruff."
    cat "$f"
  } > "$f.tmp"
  mv "$f.tmp" "$f"
done
.venv/bin/ruff format -q bridge/sparkplug/sparkplug_b_pb2.py bridge/sparkplug/sparkplug_b_pb2.pyi
