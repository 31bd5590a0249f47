#!/usr/bin/env bash
# The whole SLURM path on one machine, as docs/slurm.md "The whole path, step by step" shows
# it: install, env builds (online and offline), data prep, a run config with a [slurm]
# section, submit to a local SLURM of 3 fake nodes, watch, a live env registered through
# the env API while the job trains, preemption (USR1 -> checkpoint -> requeue -> resume),
# export, serve, and stopping the cluster.
#
# Run as root inside a loopback-only network namespace (Ray and SLURM bind ports; nothing
# here needs the network once .venv exists):
#
#   unshare -n sh -c 'ip link set lo up && exec bash examples/slurm/walkthrough.sh'
#
# Everything goes under $W (default /tmp/cvl-wt, deleted first); the repo is not written to.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
W=${W:-/tmp/cvl-wt}
STEPS=${STEPS:-60}
export PATH="$REPO/.venv/bin:$PATH"
cd "$REPO"

say() { printf '\n== %s  [%s]\n' "$*" "$(date '+%H:%M:%S')"; }
run() { printf '$ %s\n' "$*"; "$@"; }

[ "$(id -u)" = 0 ] || { echo "run as root (the local SLURM runs munged and slurmd)"; exit 1; }
if ip -o addr show | grep -v ' lo ' | grep -q 'inet'; then
    echo "run inside a loopback-only network namespace: unshare -n sh -c 'ip link set lo up && exec bash $0'"
    exit 1
fi
if [ -f "$W/slurm.conf" ]; then python -m slurm.local_cluster stop "$W" || true; fi
rm -rf "$W"
mkdir -p "$W"
chmod 755 "$W"

SERVE_PID=
cleanup() {
    [ -n "$SERVE_PID" ] && kill "$SERVE_PID" 2>/dev/null || true
    if [ -f "$W/slurm.conf" ] && [ -z "${STOPPED:-}" ]; then python -m slurm.local_cluster stop "$W"; fi
}
trap cleanup EXIT

# wait_for WHAT SECONDS COMMAND...: until COMMAND succeeds; the job's output if it times out
wait_for() {
    local what=$1 limit=$2 t0=$SECONDS
    shift 2
    until "$@"; do
        if (( SECONDS - t0 > limit )); then
            echo "timed out after ${limit}s waiting for $what; the job's output:"
            tail -n 40 "$LOG" 2>/dev/null || true
            exit 1
        fi
        sleep 1
    done
    echo "($what after $((SECONDS - t0)) s)"
}
steps_done() { [ -f "$RUN/metrics.jsonl" ] && wc -l < "$RUN/metrics.jsonl" || echo 0; }
at_least() { (( $(steps_done) >= $1 )); }
in_log() { grep -q -- "$1" "$LOG" 2>/dev/null; }

say "1. Login node: install (creates .venv and installs the pinned set; nothing to do once it exists)"
run make -C "$REPO" install
run caravela --help | sed -n 1,2p

say "2. Login node: build the reward envs into a store on the shared filesystem"
# the run's env (gsm8k is left out: the running job builds it when it registers, step 6)
run caravela env build --store "$W/envs" arith
# offline, from uv's cache only (what a machine without internet has)
run caravela env build --store "$W/envs-offline" --offline math
# offline from a wheelhouse, no package index: arith and gsm8k need no wheels; math's
# requirements are not in this (empty) wheelhouse, so it is refused, naming them
mkdir -p "$W/wheelhouse"
run caravela env build --store "$W/envs-wheelhouse" --offline --wheelhouse "$W/wheelhouse" arith gsm8k
run caravela env build --store "$W/envs-wheelhouse" --offline --wheelhouse "$W/wheelhouse" math 2>&1 \
    | head -n 2 | cut -c1-400 || true

say "3. Login node: data prep"
# GSM8K-format rows (question, answer ending "#### N") -> Caravela's columns (id, prompt,
# answer, env); first the shipped sample rows
run python examples/data_prep/prep_gsm8k.py examples/data_prep/samples/gsm8k_format.jsonl \
    "$W/data/gsm8k_samples.jsonl" --env gsm8k
head -n 1 "$W/data/gsm8k_samples.jsonl"
# the live env's dataset: 4 rows are too few (a step that draws one of them twice, across an
# epoch, fails the run: docs/slurm.md), so 300 rows in GSM8K's format, made from the tiny
# model's arithmetic (the last rows of its training file), converted the same way
mkdir -p "$W/data/raw"
tail -n 300 examples/tiny_arith/data/train.jsonl \
    | jq -c '{question: .prompt, answer: "\(.prompt | ltrimstr("Q: ") | rtrimstr(" A: ")) = \(.answer)\n#### \(.answer)"}' \
    > "$W/data/raw/arith_gsm8k_format.jsonl"
head -n 1 "$W/data/raw/arith_gsm8k_format.jsonl"
run python examples/data_prep/prep_gsm8k.py "$W/data/raw/arith_gsm8k_format.jsonl" \
    "$W/data/gsm8k.jsonl" --env gsm8k
head -n 1 "$W/data/gsm8k.jsonl"

RUN="$W/run"
LOG=/dev/null
cat > "$W/local-profile.toml" <<EOF
# the site profile: 2 CPUs and 1 (fake) GPU per node, Ray on lo, per-node scratch
name = "local"
cpus_per_node = 2
gpus_per_node = 1
ray_interface = "lo"
node_tmp = "$W/scratch-\$SLURM_JOB_ID"
EOF
cat > "$W/run.toml" <<EOF
model = "$REPO/examples/tiny_arith/model"
output_dir = "$RUN"
prepared_dir = "$W/prepared"
steps = $STEPS

[[datasets]]
path = "$REPO/examples/tiny_arith/data/train.jsonl"
env = "arith"

[[envs]]
name = "arith"
path = "$REPO/reward_envs/builtin/arith"
workers = 1
isolation = { type = "venv", store = "$W/envs" }

[rollout]
prompts_per_step = 8

[trainer]
cpus_per_rank = 1

[inference]
backend = { type = "transformers", cpus_per_engine = 1 }

[checkpoint]
every_steps = 0              # only the one the preemption asks for, and the last

[eval]
heldout = "$REPO/examples/tiny_arith/data/heldout.jsonl"
num_prompts = 8
k = 2

[logging]
trackers = ["tensorboard", "wandb"]   # W&B offline: wandb sync later, from the login node

[env_api]
enabled = true               # the driver serves the env API on the head's 127.0.0.1:8710
workers = 1

[slurm]
profile = "$W/local-profile.toml"
nodes = 3                    # 1 inference node + 2 trainer nodes
inference_nodes = 1
time = "00:30:00"
EOF
echo "$ cat $W/run.toml"
cat "$W/run.toml"
run caravela data prepare "$W/run.toml" --workers 2

say "4. Submit to the local SLURM (3 nodes of 2 CPUs and 1 fake GPU)"
run python -m slurm.local_cluster start "$W" --nodes 3 --gpus 1
export SLURM_CONF="$W/slurm.conf"
run sinfo
run caravela slurm render "$W/run.toml" --dry-run | grep '^#SBATCH'
SUBMIT=$(caravela slurm submit "$W/run.toml")
echo "$ caravela slurm submit $W/run.toml"
echo "$SUBMIT"
JOB=$(sed -n 's/^submitted job \([0-9]*\);.*/\1/p' <<<"$SUBMIT")
LOG="$RUN/slurm-$JOB.out"
jq -r '"resolved: env_api.offline=\(.env_api.offline) rollout.max_staleness=\(.rollout.max_staleness) trainer.ranks_per_node=\(.trainer.ranks_per_node) backend=\(.inference.backend.type)"' "$RUN/config.json"

say "5. Watch"
run squeue -j "$JOB" -o '%.5i %.9P %.10j %.8T %.6D %R'
wait_for "two training steps" 600 at_least 2
run squeue -j "$JOB" -o '%.5i %.8T %.10M %.6D %N'
grep -E 'caravela: (job|node|Ray cluster|dashboard)|env API on' "$LOG"
echo "$ tail -n 1 $RUN/metrics.jsonl | jq -c '{step, reward_mean, groups_kept, step_seconds}'"
tail -n 1 "$RUN/metrics.jsonl" | jq -c '{step, reward_mean, groups_kept, step_seconds}'
# the dashboard binds the head's loopback: from a login node, ssh -L 8265:127.0.0.1:8265 node0
echo "$ curl http://127.0.0.1:8265/api/version  (no token, then the job's token)"
curl -s -o /dev/null -w 'HTTP %{http_code} without the token\n' http://127.0.0.1:8265/api/version
curl -s -H "Authorization: Bearer $(cat "$RUN/ray-auth-token")" http://127.0.0.1:8265/api/version \
    | jq -c '{ray_version, session_name}'

say "6. Register a live env through the env API while the job trains"
# from a login node: ssh -L 8710:127.0.0.1:8710 node0 first (the head's loopback)
TOKEN=$(cat "$RUN/env-api/api-token")
API=(-s -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json')
BODY="{\"path\": \"$REPO/reward_envs/builtin/gsm8k\", \"mixture\": {\"dataset\": \"$W/data/gsm8k.jsonl\", \"weight\": 0.5}}"
echo "$ curl -X POST http://127.0.0.1:8710/v1/envs -d '$BODY'"
curl "${API[@]}" -X POST http://127.0.0.1:8710/v1/envs -d "$BODY" | jq -c '{name, status, isolation}'
ready() { [ "$(curl "${API[@]}" http://127.0.0.1:8710/v1/envs/gsm8k | jq -r .status)" != building ]; }
wait_for "the env's build and canary" 300 ready
echo "$ curl http://127.0.0.1:8710/v1/envs/gsm8k"
curl "${API[@]}" http://127.0.0.1:8710/v1/envs/gsm8k | jq -c '{name, status, build_hash, error}'
wait_for "gsm8k to join the mixture" 300 in_log "env 'gsm8k' joined the mixture"
grep "env 'gsm8k'" "$LOG"
JOINED=$(steps_done)
wait_for "two steps with gsm8k in the mixture" 300 at_least $((JOINED + 2))
echo "$ tail -n 1 $RUN/metrics.jsonl | jq -c '{step, live_envs, \"reward_mean/arith\", \"reward_mean/gsm8k\", \"envs/gsm8k/scored\"}'"
tail -n 1 "$RUN/metrics.jsonl" \
    | jq -c '{step, live_envs, "reward_mean/arith", "reward_mean/gsm8k", "envs/gsm8k/scored"}'

say "7. Preemption: USR1 to the batch shell -> checkpoint -> requeue -> resume"
run scancel --signal=USR1 --batch "$JOB"
wait_for "the checkpoint and the requeue" 300 in_log "requeueing"
wait_for "the requeued job to start (restart 1)" 300 in_log "restart 1 nodes"
run squeue -j "$JOB" -o '%.5i %.8T %.10M %.6D %N'
wait_for "the resumed run to finish" 900 in_log "caravela: run finished"
done_() { scontrol show job "$JOB" | grep -qE 'JobState=(COMPLETED|FAILED|CANCELLED) '; }
wait_for "the job to end" 120 done_
scontrol show job "$JOB" | grep -oE '(JobState|Restarts|RunTime)=[^ ]+' | paste -sd' '
echo "$ grep -E 'caravela:|checkpoint|resum|joined|before|after|env API' $LOG  (paths kept)"
grep -E 'caravela: (job|USR1|checkpoint|requeued|resuming|no checkpoint|run finished|the run failed|Ray logs)|checkpoint /|resumed from|joined|re-?join|before \[|after \[|env API on|SLURM is ending' "$LOG"
echo "$ every 10th step line"
grep -E ' step +[0-9]*0 ' "$LOG" || true
python - "$RUN" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
def logged(name):
    p = run / name
    return [int(json.loads(x)["step"]) for x in p.read_text().splitlines()] if p.exists() else []
steps, prompts = logged("metrics.jsonl"), logged("prompts.jsonl")
print(f"metrics.jsonl: {len(steps)} lines, steps {steps[0]}..{steps[-1]}, each once: "
      f"{sorted(steps) == list(range(len(steps)))}; prompts.jsonl the same: {prompts == steps}")
for name in ("metrics.superseded.jsonl", "prompts.superseded.jsonl"):
    print(f"{name}: steps {logged(name)} (the first try's, redone after the resume)")
PY
echo "$ tail -n 1 $RUN/metrics.jsonl | jq -c '{step, live_envs, \"reward_mean/arith\", \"reward_mean/gsm8k\"}'"
tail -n 1 "$RUN/metrics.jsonl" | jq -c '{step, live_envs, "reward_mean/arith", "reward_mean/gsm8k"}'
run ls "$RUN" "$RUN/checkpoints" "$RUN/ray-logs"
run ls -d "$RUN"/wandb/offline-run-*
# wandb sync "$RUN"/wandb/offline-run-*   # from a login node with internet: not run here

say "8. Export the last checkpoint as an HF model directory"
run caravela export "$RUN" "$W/tiny-arith-grpo"
run ls "$W/tiny-arith-grpo"

say "9. Serve it (OpenAI-compatible, 127.0.0.1) and ask once"
caravela serve "$W/tiny-arith-grpo" --backend transformers --port 8000 > "$W/serve.log" 2>&1 &
SERVE_PID=$!
up() { curl -sf http://127.0.0.1:8000/health > /dev/null; }
wait_for "the server" 180 up
REQ='{"model": "tiny-arith-grpo", "prompt": "Q: 12+30-5 A: ", "max_tokens": 40, "temperature": 0}'
echo "$ curl http://127.0.0.1:8000/v1/completions -d '$REQ'"
curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' -d "$REQ" \
    | jq -c '{model, text: .choices[0].text, finish_reason: .choices[0].finish_reason, usage}'
kill "$SERVE_PID"
wait "$SERVE_PID" 2>/dev/null || true
SERVE_PID=

say "10. Stop the cluster"
run python -m slurm.local_cluster stop "$W"
STOPPED=1
left=$(pgrep -f -- "$W" | grep -v "^$$\$" | wc -l || true)
echo "processes still mentioning $W: $left"
say "done"
