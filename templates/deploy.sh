#!/usr/bin/env bash
# TileStream on Dataflow: build, publish and operate the Flex Template. See docs/deploy.md.
#
#   templates/deploy.sh preflight   offline: will a launch work? (torch, graph, metadata, IAM, HCL)
#   templates/deploy.sh infra       terraform apply (topic, subscription, notification, tables, SAs)
#   templates/deploy.sh model       publish the shipped student (or MODEL_DIR) to the registry
#   templates/deploy.sh image       build and push the GPU image with Cloud Build (IMAGE_KIND=cpu)
#   templates/deploy.sh template    write the Flex Template spec to gs://
#   templates/deploy.sh check       on a GPU VM: the image sees CUDA and scores one chip
#   templates/deploy.sh run         launch the streaming job on GPU workers (first launch)
#   templates/deploy.sh update      replace the running job in place, if its state carries over
#   templates/deploy.sh bluegreen   start this release beside the live one (green: its rows shadow), its
#                                   subscription seeded from a snapshot of the live one's
#   templates/deploy.sh compare     green against blue: dead letters, latency, agreement
#   templates/deploy.sh cutover     make green live; once it says so and the handover passes (every
#                                   message green took in as shadow answered), drain the retiring job
#   templates/deploy.sh handover    after a cutover that exited 4: check the handover again (WAIT_SECS)
#   templates/deploy.sh abort       end green's trial, then drain green's job; the live one never stopped
#   templates/deploy.sh drain ROLE  drain one job by its role (finish in-flight work, then stop):
#                                   retiring  the job live before the last cutover, once the handover
#                                             passes (what cutover does after exit 0)
#                                   green     the job on trial (what abort does)
#                                   live      the job answering now: stops the stream
#
# Settings come from the environment (or templates/deploy.env, never committed):
#   PROJECT, REGION, and after `infra`: everything else is read from terraform outputs.
#   RELEASE defaults to this tree's (pipeline/options.py). docs/operations.md, "Releasing the
#   stream", walks through update vs blue-green.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
[[ -x $PYTHON ]] || PYTHON=python3

if [[ ${1:-} == preflight ]]; then  # offline: needs no project, no credentials
  shift
  exec "$PYTHON" -m pipeline.ops.preflight "$@"
fi

# shellcheck source=/dev/null
[[ -f templates/deploy.env ]] && source templates/deploy.env
: "${PROJECT:?set PROJECT}"
REGION=${REGION:-us-central1}
NAME=${NAME:-tilestream}
JOB_NAME=${JOB_NAME:-tilestream}
RELEASE=${RELEASE:-$("$PYTHON" -c 'from pipeline.options import RELEASE; print(RELEASE)')}
TAG=${TAG:-$(git rev-parse --short HEAD)}
IMAGE_KIND=${IMAGE_KIND:-gpu}
GPU=${GPU:-nvidia-l4}
MACHINE_TYPE=${MACHINE_TYPE:-g2-standard-4}
MAX_WORKERS=${MAX_WORKERS:-4}
TF_DIR=templates/terraform

tf_output() { terraform -chdir="$TF_DIR" output -raw "$1"; }

repo() { tf_output image_repository; }
image() { echo "$(repo)/tilestream-${IMAGE_KIND}:${TAG}"; }
spec() { echo "gs://$(tf_output dataflow_bucket)/templates/tilestream-${IMAGE_KIND}-${TAG}.json"; }
# The stream follows the registry's channels (live, shadow, canary models; the green release):
# `deploy.sh model` publishes there, and the workers read it through roles/dataflow.worker.
registry() { tf_output registry; }

# Template parameters: the example set, with this deployment's resources.
parameters() {  # parameters SUBSCRIPTION
  local extra
  extra="subscription=$1,bq_dataset=$(tf_output bq_dataset),release=$RELEASE"
  extra+=",input_buckets=$(tf_output input_buckets)"
  extra+=",output_prefix=$(tf_output output_prefix),model_registry=$(registry)"
  extra+=",results_topic=$(tf_output results_topic)"
  if [[ $IMAGE_KIND == gpu ]]; then
    extra+=",device=GPU,accelerator=type:${GPU};count:1;install-nvidia-driver"
  else
    extra+=",device=CPU"
  fi
  echo "$extra"
}

# One SDK process per vCPU sharing the GPU through NVIDIA MPS: chipping (GDAL decode, numpy)
# is CPU-bound and parallelises across processes, while the student needs ~100 MB of GPU
# memory per process, so MPS lets all of them use the GPU concurrently instead of time-slicing.
gpu_service_options() {
  echo "worker_accelerator=type:${GPU};count:1;install-nvidia-driver;use_nvidia_mps"
}

launch() {  # launch JOB SUBSCRIPTION [extra gcloud flags...]
  local job=$1 subscription=$2
  shift 2
  local flags=(
    --project="$PROJECT" --region="$REGION"
    --template-file-gcs-location="$(spec)"
    --service-account-email="$(tf_output worker_service_account)"
    --staging-location="gs://$(tf_output dataflow_bucket)/staging"
    --temp-location="gs://$(tf_output dataflow_bucket)/tmp"
    --max-workers="$MAX_WORKERS"
    --enable-streaming-engine
    --parameters="$(parameters "$subscription")"
    --parameters=sdk_container_image="$(image)"
  )
  if [[ $IMAGE_KIND == gpu ]]; then
    flags+=(--worker-machine-type="$MACHINE_TYPE"
            --additional-pipeline-options="dataflow_service_options=$(gpu_service_options)")
  fi
  gcloud dataflow flex-template run "$job" "${flags[@]}" "$@"
}

job_id() {  # job_id NAME
  gcloud dataflow jobs list --project="$PROJECT" --region="$REGION" --status=active \
    --filter="name=$1" --format='value(id)' | head -n 1
}

drain() {  # drain NAME
  gcloud dataflow jobs drain "$(job_id "$1")" --project="$PROJECT" --region="$REGION"
}

drain_job() {  # drain_job ROLE NAME: refuses a job it cannot name
  if [[ -z $2 ]]; then
    echo "deploy.sh drain $1: no $1 job is recorded in the channels: nothing drained" >&2
    exit 2
  fi
  echo "draining the $1 job $2" >&2
  drain "$2"
}

release() {  # release VERB [args...]: the release channel in the registry's channels.json
  "$PYTHON" -m pipeline.ops.cli release "$@" --registry "$(registry)" --project "$PROJECT" \
    --bq_dataset "$(tf_output bq_dataset)"
}

# A field of the release channel: channel live|green|retiring, field release|subscription|job
# (retiring: the release live before the last cut-over, while no release change came after).
channel() {
  release status | "$PYTHON" -c 'import json, sys
doc = json.load(sys.stdin)
ref = doc.get("retiring") if sys.argv[1] == "retiring" else (doc.get("releases") or {}).get(sys.argv[1])
print((ref or {}).get(sys.argv[2], ""))' "$1" "$2"
}

# The job's update surface, kept beside the template at each launch: what `update` compares.
surface_uri() { echo "gs://$(tf_output dataflow_bucket)/releases/$1.json"; }
record_surface() {  # record_surface JOB SUBSCRIPTION
  local file
  file=$(mktemp)
  "$PYTHON" -m pipeline.ops.release surface --parameters "$(parameters "$2")" >"$file"
  gcloud storage cp "$file" "$(surface_uri "$1")"
}

drain_role() {  # drain_role retiring|green|live
  case "$1" in
    retiring)
      # Only once the handover of the last cut-over passes (exit 0): a retiring job drained
      # earlier would leave what it had not answered to nobody.
      release handover "$(channel live release)" --wait_secs "${WAIT_SECS:-600}"
      drain_job retiring "$(channel retiring job)"
      ;;
    green) drain_job green "$(channel green job)" ;;
    live)  # a deployment launched before releases were recorded: the job of its first launch
      job=$(channel live job)
      drain_job live "${job:-$JOB_NAME}"
      ;;
    *)
      echo "deploy.sh drain: say which job: drain retiring|green|live" >&2
      exit 2
      ;;
  esac
}

case "${1:-}" in
  infra)
    terraform -chdir="$TF_DIR" init -input=false
    terraform -chdir="$TF_DIR" apply -var="project=$PROJECT" -var="region=$REGION" \
      -var="name=$NAME"
    ;;
  model)
    # Validated (card, sha256, torch version, one scored chip) and written card-last.
    "$PYTHON" -m pipeline.ops.cli model publish --registry "$(registry)" \
      "${MODEL_DIR:-model/artifacts/landcover-student/v1}"
    # A first model goes live; later ones are promoted, canaried or shadowed by hand.
    live=$("$PYTHON" -m pipeline.ops.cli model status --registry "$(registry)" |
      "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["live"] or "")')
    if [[ -z $live ]]; then
      "$PYTHON" -m pipeline.ops.cli model promote --registry "$(registry)" \
        --reason "first model of the deployment" "${MODEL_REF:-landcover-student/1}"
    fi
    ;;
  image)
    dockerfile=templates/Dockerfile
    [[ $IMAGE_KIND == cpu ]] && dockerfile=templates/Dockerfile.cpu
    gcloud builds submit --project="$PROJECT" --region="$REGION" \
      --config=templates/cloudbuild.yaml \
      --substitutions="_IMAGE=$(image),_DOCKERFILE=$dockerfile" .
    ;;
  template)
    gcloud dataflow flex-template build "$(spec)" --image="$(image)" --sdk-language=PYTHON \
      --metadata-file=templates/metadata.json --project="$PROJECT"
    ;;
  check)
    docker run --rm --gpus all --entrypoint tilestream "$(image)" check --device=GPU \
      --model_uri="${CHECK_MODEL_URI:-$(registry)/${MODEL_REF:-landcover-student/1}}"
    ;;
  run)
    subscription=$(tf_output subscription)
    launch "$JOB_NAME" "$subscription"
    release live "$RELEASE" --subscription "$subscription" --job "$JOB_NAME"
    record_surface "$JOB_NAME" "$subscription"
    ;;
  update)
    # In place only if the running job's state carries over: checked against the surface
    # recorded at its launch, before Dataflow is called. Moved steps get their mapping.
    job=$(channel live job)
    job=${job:-$JOB_NAME}
    subscription=$(channel live subscription)
    subscription=${subscription:-$(tf_output subscription)}
    running=${RUNNING_SURFACE:-$(mktemp)}
    [[ -n ${RUNNING_SURFACE:-} ]] || gcloud storage cp "$(surface_uri "$job")" "$running"
    if ! mapping=$("$PYTHON" -m pipeline.ops.release check "$running" \
        --parameters "$(parameters "$subscription")"); then
      echo "deploy.sh update: refused before Dataflow was called (see above)" >&2
      exit 3
    fi
    extra=(--update)
    [[ -n $mapping ]] && extra+=(--transform-name-mappings="$mapping")
    launch "$job" "$subscription" "${extra[@]}"
    release live "$RELEASE" --subscription "$subscription" --job "$job"
    record_surface "$job" "$subscription"
    ;;
  bluegreen)
    # Green: this release as a second job on the idle subscription slot, every row shadow.
    live_subscription=$(channel live subscription)
    IFS=, read -r slot_a slot_b <<<"$(tf_output subscription_slots)"
    idle=$slot_b
    [[ $live_subscription == "$slot_b" ]] && idle=$slot_a
    green_job="${NAME}-${RELEASE//./-}"
    # `release green` seeks the idle slot to a snapshot of the live one first: green takes in
    # all the live job has not acknowledged, so the handover covers the live job's backlog.
    release green "$RELEASE" --subscription "$idle" --job "$green_job"
    launch "$green_job" "$idle"
    record_surface "$green_job" "$idle"
    ;;
  compare)
    release compare --blue "$(channel live release)" --green "$RELEASE" --hours "${HOURS:-1}"
    ;;
  cutover)
    # The retiring job is drained only once the handover passes (exit 0); on 4 nothing is
    # drained: check again with `handover`, then `drain retiring`.
    rc=0
    release cutover "$RELEASE" --wait_secs "${WAIT_SECS:-600}" || rc=$?
    if ((rc == 4)); then
      echo "deploy.sh cutover: the retiring job was not drained; check again with" \
        "\`deploy.sh handover\`, then \`deploy.sh drain retiring\`" >&2
    fi
    ((rc == 0)) || exit "$rc"
    drain_job retiring "$(channel retiring job)"
    ;;
  handover)
    release handover "$(channel live release)" --wait_secs "${WAIT_SECS:-600}"
    ;;
  abort)
    # Aborted, green's rows are shadow by rule at once; its job is drained after.
    green_job=$(channel green job)
    release abort "$RELEASE"
    drain_job green "$green_job"
    ;;
  drain)
    drain_role "${2:-}"
    ;;
  *)
    sed -n '2,28p' "$0"
    exit 2
    ;;
esac
