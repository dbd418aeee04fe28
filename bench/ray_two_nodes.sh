#!/usr/bin/env bash
# A two-node Ray cluster on this one machine (two raylets on loopback, one CPU each), and one
# `vit-extract run --engine ray` on it with an actor per node: the recipe of the README's
# "Beyond one machine", run where no second machine exists. Run as root from the repository root:
#     unshare --net bash bench/ray_two_nodes.sh [IMAGES_FOLDER]
# (a network namespace with loopback only: Ray advertises the machine's address otherwise).
set -euo pipefail
ip link set lo up
images=${1:-sample_images}
out=$(mktemp -d)
ray=.venv/bin/ray
trap '$ray stop --force > /dev/null 2>&1; rm -rf "$out"' EXIT
export RAY_AUTH_MODE=token  # both nodes and the driver share the token in ~/.ray/auth_token
$ray get-auth-token --generate > /dev/null 2>&1 || true
$ray start --head --node-ip-address 127.0.0.1 --port 6379 --num-cpus 1 --include-dashboard false \
    --disable-usage-stats > "$out/head.log" 2>&1
$ray start --address 127.0.0.1:6379 --node-ip-address 127.0.0.1 --num-cpus 1 --disable-usage-stats > "$out/node.log" 2>&1
.venv/bin/python -c "import ray; ray.init(address='127.0.0.1:6379', logging_level='ERROR'); print(len(ray.nodes()), 'nodes:', ray.cluster_resources().get('CPU'), 'CPUs')"
time .venv/bin/vit-extract run "$images" -o "$out/t.h5" --model small --engine ray --ray-address 127.0.0.1:6379 \
    --actors 2 --unit-size 2 --progress lines --progress-every 0
.venv/bin/vit-extract info "$out/t.h5" | head -3
