#!/usr/bin/env bash
# The README's first command (`just demo`, after `just up`, which installs the chart): the
# default lanes, runner processes for the two Dedicated lanes, one job per model, live progress, a wrong
# parameter and a burst refused at admission, and a summary. Exits non-zero if any job does
# not succeed or admission does not refuse what it should.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
export KUBECONFIG="$STATE/kubeconfig"
kubectl() { "$("$HERE/tools.sh")/kubectl" "$@"; }

# The runners start as soon as their lanes' pods exist: build them first, so that a lane does
# not sit without a runner (a capacity fallback after 60 s) while cargo builds.
eval "$("$REPO/gpu-runner/scripts/setup-torch.sh")"
cargo build --quiet --manifest-path "$REPO/Cargo.toml" -p framelane-runner
echo "The Helm release (charts/framelane) and the default models it installed:"
"$("$HERE/tools.sh")/helm" list -n framelane-system
kubectl get videomodels
# The Dedicated lanes first, so their runner pods get the two fake GPUs; the Shared lane's
# pod then waits for a free GPU (Pending), as it would on a full cluster.
kubectl create --dry-run=client -o json -f "$REPO/examples/modellanes.yaml" | python3 -c '
import json, sys
text, decoder, at = sys.stdin.read(), json.JSONDecoder(), 0
while text[at:].strip():
    lane, end = decoder.raw_decode(text, at + len(text[at:]) - len(text[at:].lstrip()))
    at = end
    if lane["spec"]["mode"] == "Dedicated":
        print(json.dumps(lane))' | kubectl apply -f -
# The operator creates the lanes' runner pods; wait for them to exist, then to run.
for _ in $(seq 120); do
  [ "$(kubectl get pods -n framelane-system -l 'framelane.dev/lane in (anisora,phr00t)' -o name | wc -l)" -ge 2 ] && break
  sleep 0.5
done
kubectl wait -n framelane-system --for=condition=Ready pod -l 'framelane.dev/lane in (anisora,phr00t)' --timeout=60s >/dev/null
kubectl apply -f "$REPO/examples/modellanes.yaml"
"$HERE/runners.sh" anisora phr00t
kubectl wait --for=jsonpath='{.status.readyRunners}'=1 modellane/anisora modellane/phr00t --timeout=120s >/dev/null

kubectl delete -n default videojob cat-on-beach lighthouse-storm --ignore-not-found --wait >/dev/null
# The example jobs (anisora: image to video from inputs/first-frame.png on the model volume;
# phr00t: text to video) at a size 2 CPU cores make in a minute or two.
kubectl create --dry-run=client -o json -f "$REPO/examples/videojob.yaml" -f "$REPO/examples/videojob-phr00t.yaml" | python3 -c '
import json, sys
text, decoder, at = sys.stdin.read(), json.JSONDecoder(), 0
while text[at:].strip():
    job, end = decoder.raw_decode(text, at + len(text[at:]) - len(text[at:].lstrip()))
    at = end
    job["spec"].update({"width": 256, "height": 256, "frames": 17})
    print(json.dumps(job))' | kubectl apply -n default -f -
echo
echo "Nodes, lanes and runner pods (kwok plays the pods; runner processes play their code):"
kubectl get nodes -o 'custom-columns=NODE:.metadata.name,READY:.status.conditions[?(@.type=="Ready")].status,GPUS:.status.allocatable.nvidia\.com/gpu'
kubectl get modellanes
kubectl get pods -n framelane-system -o wide
echo
echo "Jobs, every 2 s (kubectl get videojobs -n default):"
deadline=$((SECONDS + 600))
while :; do
  kubectl get videojobs -n default
  phases=$(kubectl get videojobs -n default -o jsonpath='{.items[*].status.phase}')
  case "$phases" in *Failed*) break ;; esac
  [ "$phases" = "Succeeded Succeeded" ] && break
  if ((SECONDS > deadline)); then log "jobs not finished after 10 minutes"; break; fi
  sleep 2
done

echo
echo "Admission: a wrong parameter is refused before anything is stored (HTTP 422):"
echo '$ kubectl apply -f -   # an anisora job with steps: 20'
refused=$(kubectl apply -n default -f - 2>&1 <<EOF || true
apiVersion: framelane.dev/v1alpha1
kind: VideoJob
metadata: {name: cat-twenty-steps}
spec: {model: anisora, mode: i2v, image: inputs/first-frame.png, prompt: a cat surfing at dusk, steps: 20}
EOF
)
echo "$refused"
[[ "$refused" == *"spec.steps: must be 8"* ]] || { log "the wrong steps were not refused"; exit 1; }
echo '$ kubectl apply -f -   # an anisora job whose image is a file:// URL, and a phr00t job in i2v'
refused=$(kubectl apply -n default -f - 2>&1 <<EOF || true
apiVersion: framelane.dev/v1alpha1
kind: VideoJob
metadata: {name: cat-from-etc}
spec: {model: anisora, mode: i2v, image: "file:///etc/passwd", prompt: a cat}
---
apiVersion: framelane.dev/v1alpha1
kind: VideoJob
metadata: {name: lighthouse-from-image}
spec: {model: phr00t, mode: i2v, image: inputs/first-frame.png, prompt: a lighthouse}
EOF
)
echo "$refused"
[[ "$refused" == *"spec.image: scheme file: is not allowed"* && "$refused" == *"spec.mode: model phr00t does not offer i2v"* ]] \
  || { log "the image outside the model volume or the mode phr00t lacks was not refused"; exit 1; }

echo
echo "Admission: a burst of 30 jobs at the anisora lane (maxDepth 25); what does not fit is refused (HTTP 503):"
for i in $(seq 30); do
  printf 'apiVersion: framelane.dev/v1alpha1\nkind: VideoJob\nmetadata: {name: burst-%d, labels: {framelane.dev/demo: burst}}\nspec: {model: anisora, mode: i2v, image: inputs/first-frame.png, prompt: burst %d, width: 256, height: 256, frames: 5}\n---\n' "$i" "$i"
done >"$STATE/burst.yaml"
burst=$(kubectl create -n default -f "$STATE/burst.yaml" 2>&1 || true)
admitted=$(grep -c ' created$' <<<"$burst" || true)
overloaded=$(grep -c 'queue_overloaded' <<<"$burst" || true)
echo "  admitted: $admitted, refused with queue_overloaded: $overloaded; one refusal:"
grep -m1 'queue_overloaded' <<<"$burst" | sed 's/^/  /' || true
((admitted + overloaded == 30 && overloaded > 0)) || { log "the burst was not limited: $burst"; exit 1; }
# Deleting cancels them (a runner may have started one: it stops at its next step) and frees
# their slots; wait until they are gone, so the summary shows the demo's own jobs.
kubectl delete videojobs -n default -l framelane.dev/demo=burst --timeout=120s >/dev/null

echo
echo "Fallback: a third GPU node joins, so the Shared lane's pod (Pending until now) gets a GPU:"
kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Node
metadata:
  name: gpu-node-3
  annotations: {kwok.x-k8s.io/node: fake}
  labels: {type: kwok, kubernetes.io/hostname: gpu-node-3, framelane.dev/demo: node}
status:
  capacity: {cpu: "16", memory: 64Gi, pods: "110", nvidia.com/gpu: "1"}
  allocatable: {cpu: "16", memory: 64Gi, pods: "110", nvidia.com/gpu: "1"}
EOF
kubectl wait -n framelane-system --for=condition=Ready pod -l framelane.dev/lane=shared --timeout=120s >/dev/null
"$HERE/runners.sh" shared
kubectl wait --for=jsonpath='{.status.readyRunners}'=1 modellane/shared --timeout=120s >/dev/null
echo '$ kubectl patch modellane anisora --type=merge -p '"'"'{"spec":{"fallback":{"force":true}}}'"'"'   # an admin drains lane anisora'
kubectl patch modellane anisora --type=merge -p '{"spec":{"fallback":{"force":true}}}' >/dev/null
kubectl wait --for=jsonpath='{.status.fallback.active}'=true modellane/anisora --timeout=60s >/dev/null
kubectl get modellanes
kubectl delete -n default videojob cat-on-shared --ignore-not-found --wait >/dev/null
kubectl create -n default -f - >/dev/null <<EOF
apiVersion: framelane.dev/v1alpha1
kind: VideoJob
metadata: {name: cat-on-shared}
spec: {model: anisora, mode: i2v, image: inputs/first-frame.png, prompt: a cat surfing at dusk on the shared lane, width: 256, height: 256, frames: 17}
EOF
kubectl wait -n default --for=jsonpath='{.status.phase}'=Succeeded videojob/cat-on-shared --timeout=300s >/dev/null
echo "  cat-on-shared ran on lane $(kubectl get vj -n default cat-on-shared -o jsonpath='{.status.lane} ({.status.laneMode}, cause {.status.fallbackCause}, from lane {.status.fallbackFrom})')"
echo '$ kubectl patch modellane anisora --type=merge -p '"'"'{"spec":{"fallback":{"force":false}}}'"'"'  # maintenance over'
kubectl patch modellane anisora --type=merge -p '{"spec":{"fallback":{"force":false}}}' >/dev/null
kubectl wait --for=jsonpath='{.status.fallback.active}'=false modellane/anisora --timeout=60s >/dev/null
# Events are posted off the reconcile path: wait for the episode's end to be told.
events() {
  kubectl get events -A --field-selector involvedObject.kind=ModelLane,involvedObject.name=anisora \
    -o custom-columns=REASON:.reason,MESSAGE:.message | grep -E '^Fallback.*\(manual\)' || true
}
for _ in $(seq 100); do [[ "$(events)" == *FallbackEnded* ]] && break; sleep 0.2; done
events | sed 's/^/  /'

echo
echo "Summary:"
kubectl get videojobs -n default -o json | OUTPUTS="$STATE/outputs" python3 -c '
import json, os, sys
from datetime import datetime
def t(s): return datetime.fromisoformat(s.replace("Z", "+00:00")) if s else None
rows = [("JOB", "MODEL", "LANE", "PHASE", "REASON", "SECONDS", "OUTPUT")]
ok = True
for j in json.load(sys.stdin)["items"]:
    st = j.get("status", {})
    start, end = t(st.get("queuedAt")), t(st.get("finishedAt"))
    secs = f"{(end - start).total_seconds():.1f}" if start and end else "-"
    out = st.get("output", {}).get("path")
    rows.append((j["metadata"]["name"], j["spec"]["model"], st.get("lane", "-"), st.get("phase", "-"),
                 st.get("reason", "-"), secs, os.path.join(os.environ["OUTPUTS"], out) if out else "-"))
    ok = ok and st.get("phase") == "Succeeded"
widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
for r in rows:
    print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
sys.exit(0 if ok else 1)
'
kubectl get modellane anisora -o json | python3 -c '
import json, sys
e = json.load(sys.stdin)["status"]["fallback"]["lastEpisode"]
cause, seconds, start, end = e["cause"], e["durationSeconds"], e["start"], e["end"]
print(f"Fallback episode of lane anisora: cause {cause}, {seconds:.1f} s, from {start} to {end}")
'
echo
echo "The MP4s and previews are under $STATE/outputs/default/; play one with: ffplay $STATE/outputs/default/cat-on-beach/video.mp4"
echo "Everything keeps running: export KUBECONFIG=$KUBECONFIG; kubectl describe videojob -n default cat-on-beach"
echo "Stop it all with: just down"
