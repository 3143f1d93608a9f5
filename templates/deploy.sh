#!/usr/bin/env bash
# TileStream on Dataflow: build, publish and operate the Flex Template. See docs/deploy.md.
#
#   templates/deploy.sh infra       terraform apply (topic, subscription, notification, tables, SA)
#   templates/deploy.sh model       copy the shipped student (or MODEL_DIR) to gs://
#   templates/deploy.sh image       build and push the GPU image with Cloud Build (IMAGE_KIND=cpu)
#   templates/deploy.sh template    write the Flex Template spec to gs://
#   templates/deploy.sh check       on a GPU VM: the image sees CUDA and scores one chip
#   templates/deploy.sh run         launch the streaming job on GPU workers
#   templates/deploy.sh update      replace the running job in place (same job name)
#   templates/deploy.sh drain       drain the running job (finish in-flight work, then stop)
#
# Settings come from the environment (or templates/deploy.env, never committed):
#   PROJECT, REGION, and after `infra`: everything else is read from terraform outputs.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=/dev/null
[[ -f templates/deploy.env ]] && source templates/deploy.env
: "${PROJECT:?set PROJECT}"
REGION=${REGION:-us-central1}
NAME=${NAME:-tilestream}
JOB_NAME=${JOB_NAME:-tilestream}
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
model_uri() { echo "gs://$(tf_output tiles_bucket)/models/${MODEL_NAME:-landcover-student}/${MODEL_VERSION:-v1}"; }

# Template parameters: the example set, with this deployment's resources.
parameters() {
  local extra
  extra="subscription=$(tf_output subscription),bq_dataset=$(tf_output bq_dataset)"
  extra+=",input_buckets=$(tf_output input_buckets)"
  extra+=",output_prefix=$(tf_output output_prefix),model_uri=$(model_uri)"
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

launch() {  # launch [extra gcloud flags...]
  local flags=(
    --project="$PROJECT" --region="$REGION"
    --template-file-gcs-location="$(spec)"
    --service-account-email="$(tf_output worker_service_account)"
    --staging-location="gs://$(tf_output dataflow_bucket)/staging"
    --temp-location="gs://$(tf_output dataflow_bucket)/tmp"
    --max-workers="$MAX_WORKERS"
    --enable-streaming-engine
    --parameters="$(parameters)"
    --parameters=sdk_container_image="$(image)"
  )
  if [[ $IMAGE_KIND == gpu ]]; then
    flags+=(--worker-machine-type="$MACHINE_TYPE"
            --additional-pipeline-options="dataflow_service_options=$(gpu_service_options)")
  fi
  gcloud dataflow flex-template run "$JOB_NAME" "${flags[@]}" "$@"
}

job_id() {
  gcloud dataflow jobs list --project="$PROJECT" --region="$REGION" --status=active \
    --filter="name=$JOB_NAME" --format='value(id)' | head -n 1
}

case "${1:-}" in
  infra)
    terraform -chdir="$TF_DIR" init -input=false
    terraform -chdir="$TF_DIR" apply -var="project=$PROJECT" -var="region=$REGION" \
      -var="name=$NAME"
    ;;
  model)
    src=${MODEL_DIR:-model/artifacts/landcover-student/v1}
    gcloud storage cp "$src/model_card.json" "$src"/*.pt "$(model_uri)/"
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
      --model_uri="${CHECK_MODEL_URI:-$(model_uri)}"
    ;;
  run)
    launch
    ;;
  update)
    # Same job name + --update keeps state (dedup, granules, tiles in flight). Renamed steps
    # need a mapping, e.g. TRANSFORM_NAME_MAPPINGS='{"OldName":"NewName"}'.
    extra=(--update)
    [[ -n ${TRANSFORM_NAME_MAPPINGS:-} ]] && extra+=(--transform-name-mappings="$TRANSFORM_NAME_MAPPINGS")
    launch "${extra[@]}"
    ;;
  drain)
    gcloud dataflow jobs drain "$(job_id)" --project="$PROJECT" --region="$REGION"
    ;;
  *)
    sed -n '2,16p' "$0"
    exit 2
    ;;
esac
