#!/usr/bin/env bash
# A two-node Ray cluster on this one machine (two raylets on loopback, one CPU each), and one
# `vit-extract run --engine ray` on it with an actor per node, a decoding task's worker killed
# mid-run, the file compared with a plain run's: the recipe of the README's "Beyond one machine",
# run where no second machine exists. Run as root from the repository root:
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
exact=(--model small --dtype float32 --out-dtype float32 --batch-size 1)
.venv/bin/vit-extract run "$images" -o "$out/plain.h5" "${exact[@]}" --quiet  # the same inputs without Ray
# While it runs, the first decoding task's worker seen is killed (Ray names it ray::decode_range):
# Ray runs that batch again elsewhere.
.venv/bin/python bench/kill_first_decoding_worker.py > "$out/killed.txt" &
time .venv/bin/vit-extract run "$images" -o "$out/t.h5" "${exact[@]}" --engine ray --ray-address 127.0.0.1:6379 \
    --actors 2 --unit-size 2 --progress lines --progress-every 0
wait
cat "$out/killed.txt"
.venv/bin/python - "$out/plain.h5" "$out/t.h5" <<'PY'
import sys, h5py, numpy as np
with h5py.File(sys.argv[1]) as a, h5py.File(sys.argv[2]) as b:
    same = list(a["paths"].asstr()[:]) == list(b["paths"].asstr()[:]) and np.array_equal(a["tokens"][:], b["tokens"][:])
    print(f"two nodes: {len(b['paths'])} rows, equal to the plain run bit for bit: {same}")
    sys.exit(0 if same else 1)
PY
