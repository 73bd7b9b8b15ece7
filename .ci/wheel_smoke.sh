#!/usr/bin/env bash
# The package as shipped: build the sdist and the wheel, `twine check` them, install the wheel
# (never editable) into two new virtual environments and run it from there, outside the checkout.
#
# 1. training: a venv made with --system-site-packages, the wheel installed into it with
#    --no-deps, so that torch and the rest come from the environment .ci/run installed (a fresh
#    torch install took 6-14 minutes on the shared CI machine). patchad itself must be imported
#    from the venv, not from the editable checkout. Runs `patchad --version`,
#    `patchad demo --quick` and `patchad export` of the demo's PatchCore model.
# 2. torch-free: a fresh venv that sees no system package, `pip install "<wheel>[serve]"`: the
#    real dependency resolution of the core and of [serve]. `pip list` must show no torch;
#    `patchad fit` must answer with the install command; `patchad predict` and `patchad serve`
#    run the exported model, and the server answers /health, /predict and a static file of the
#    operator page from the installed package data.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
work=$(mktemp -d)
server=""
cleanup() {
    if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
say() { echo "wheel_smoke: $*"; }
pipq() { "$1/bin/python" -m pip install --quiet --disable-pip-version-check "${@:2}"; }

say "build"
python -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
python -m twine check --strict "$work/dist"/*
wheel=$(ls "$work/dist"/patchad-*.whl)
version=$(basename "$wheel" | cut -d- -f2)
cd "$work"  # nothing from the checkout on sys.path from here on

say "training venv (system site packages, the wheel with --no-deps)"
python -m venv --system-site-packages train
pipq train --no-deps "$wheel"
train/bin/python -c 'import patchad, sys; f = patchad.__file__
assert f.startswith(sys.prefix), f"patchad imported from {f}, not from the venv"'
test "$(train/bin/patchad --version)" = "patchad $version"
train/bin/patchad -q demo --quick --out demo
test -s demo/results.md
train/bin/patchad -q export --model demo/models/patchcore__part.safetensors --out part.onnx

say "torch-free venv (fresh, pip install wheel[serve])"
python -m venv plain
pipq plain "$wheel[serve]"
if plain/bin/python -m pip list --disable-pip-version-check | grep -iE '^(torch|timm) '; then
    say "the torch-free install holds torch or timm"; exit 1
fi
test "$(plain/bin/patchad --version)" = "patchad $version"
status=0
plain/bin/patchad fit --method padim --data demo/data/part --out never.safetensors 2>fit.err \
    || status=$?
test "$status" = 2
grep -qF 'fit needs torch, which is not installed: pip install "patchad[train]"' fit.err
test ! -e never.safetensors
plain/bin/patchad -q predict --model part.onnx demo/data/part/test --out predicted
test "$(tail -n +2 predicted/scores.csv | wc -l)" = "$(find demo/data/part/test -name '*.png' | wc -l)"

port=$(plain/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
plain/bin/patchad serve --model part.onnx --host 127.0.0.1 --port "$port" >serve.log 2>&1 &
server=$!
image=$(find demo/data/part/test/good -name '*.png' | sort | head -n 1)
static=$(plain/bin/python -c 'import patchad.serve.app as a; print(a.STATIC)')
case "$static" in "$work"/plain/*) ;; *) say "static files from $static"; exit 1 ;; esac
plain/bin/python - "$port" "$image" "$repo/src/patchad/serve/static/style.css" <<'EOF' \
    || { cat serve.log; exit 1; }
import json, sys, time, urllib.error, urllib.request

port, image, style = sys.argv[1:]
base = f"http://127.0.0.1:{port}"
deadline = time.monotonic() + 300  # waits on the state (a 200 from /health), not a fixed sleep
while True:
    try:
        with urllib.request.urlopen(base + "/health", timeout=10) as answer:
            if answer.status == 200:
                break
    except (urllib.error.URLError, ConnectionError):
        pass
    if time.monotonic() > deadline:
        sys.exit("serve: no 200 from /health within 300 s")
    time.sleep(0.2)
with urllib.request.urlopen(base + "/static/style.css", timeout=60) as answer:
    assert answer.read() == open(style, "rb").read(), "style.css differs from the source"
with urllib.request.urlopen(base + "/", timeout=60) as answer:
    assert b"<html" in answer.read().lower()
boundary = "patchad-smoke"
body = (
    f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
    "Content-Type: image/png\r\n\r\n"
).encode() + open(image, "rb").read() + f"\r\n--{boundary}--\r\n".encode()
request = urllib.request.Request(
    base + "/predict", data=body,
    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
)
with urllib.request.urlopen(request, timeout=120) as answer:
    result = json.load(answer)["results"][0]
print(f"wheel_smoke: serve answered /predict: score {result['score']:.4g}")
EOF
kill "$server"
wait "$server" 2>/dev/null || true
server=""
say "ok: patchad $version, sdist and wheel built, both installs ran"
